"""Training checkpoints: sharded, atomic, resumable at any world size, and pickle-free.

Layout of `output_dir/checkpoints/step_{N}/`:
    {prefix}-rank{r}.safetensors   this rank's rows of every parameter and AdamW state tensor of the
                                   model registered under `prefix` ("model", "value", ...); each
                                   file's metadata maps tensor name -> [first global row, global rows]
    rng-rank{r}.safetensors        the torch (and CUDA) generator states of rank r
    trainer_state.json             step, data position in global samples, world size, script extras
    COMPLETE                       written last; a folder without it is never resumed from

Every rank writes only its own rows (no rank gathers the model). Loading reads, for each local
shard, the overlapping rows of whichever files hold them, so a checkpoint written by W ranks
loads on any other number of ranks. Why not torch.distributed.checkpoint: its FileSystemWriter's
`.metadata` is a pickle (loading it unpickles), and its safetensors writer in torch 2.13 could not
read back a sharded save here ("header too large"); this format keeps DCP's idea (per-rank files
+ global offsets, resharding on load) in safetensors only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch

from tulu.dist import all_reduce, barrier, print0
from tulu.fsdp import local_rows, reshard
from tulu.tensorfile import TensorFile, save_tensors

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _named_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """(name, tensor) for every parameter and every AdamW state tensor of a parameter."""
    for name, p in model.named_parameters():
        yield name, p
        if optimizer is not None and p in optimizer.state:
            for key, value in optimizer.state[p].items():
                yield f"{name}::{key}", value


def _rank_file(folder: Path, prefix: str, rank: int, kind: str = "") -> Path:
    return folder / f"{prefix}{kind}-rank{rank:05d}.safetensors"


def save_checkpoint(output_dir: str | os.PathLike, step: int, modules: dict, trainer_state: dict, d,
                    keep_last_n: int = 3) -> Path:
    """Write step_{step} atomically: every rank writes into step_{step}.tmp, rank 0 adds
    trainer_state.json, renames the folder and writes COMPLETE last, then prunes old checkpoints
    (only complete ones, only after the new one is complete). modules: {prefix: (model, optimizer)}."""
    root = checkpoint_root(output_dir)
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    start = time.perf_counter()
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for prefix, (model, optimizer) in modules.items():
        reshard(model)  # every rank writes its shard rows, never a gathered full tensor
        tensors, meta = {}, {}
        for name, t in _named_state(model, optimizer):
            local, row0 = local_rows(t)
            tensors[name] = local.detach()  # copied to the host one at a time, while it is written
            meta[name] = [row0, t.shape[0] if t.ndim else 0]
        _save_into(tmp, _rank_file(tmp, prefix, d.rank), tensors, {"rows": json.dumps(meta)})
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _save_into(tmp, _rank_file(tmp, "rng", d.rank), rng)
    barrier()
    if d.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "world": d.world}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        (final / MARKER).write_text("ok\n")
        _prune(root, keep_last_n)
    barrier()
    size = sum(f.stat().st_size for f in final.iterdir()) if d.rank == 0 else 0
    print0(f"[checkpoint] saved {final} ({size / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s)")
    return final


def _save_into(folder: Path, path: Path, tensors: dict, metadata: dict | None = None) -> None:
    try:
        save_tensors(path, tensors, metadata=metadata)
    except FileNotFoundError as e:
        if folder.exists():
            raise
        raise FileNotFoundError(f"{folder} was removed while this rank was saving into it: another process is "
                                f"writing to the same output_dir (an orphan of a killed run?)") from e


def _prune(root: Path, keep_last_n: int) -> None:
    """Keep the newest keep_last_n complete checkpoints (at least the one just written); -1 keeps
    all (the original's -1 deleted all of them, a bug fixed upstream in 72d6ca9e8). Only complete
    folders older than the newest complete one are touched (never a step_N.tmp being written),
    each renamed to step_N.deleting before it is deleted, so a prune cut short never leaves a
    half-deleted folder that still looks complete; leftovers of such a cut are removed here."""
    for stale in root.glob("step_*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last_n < 0:
        return
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - max(1, keep_last_n))]:
        doomed = old.with_name(old.name + ".deleting")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step_N folders, oldest first (ordered by N as an integer, not as a string)."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MARKER).exists()]


def find_resume_point(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: an explicit folder, or with "auto" the newest complete one
    under output_dir (incomplete folders are reported and skipped); None to start fresh."""
    if resume_from in (None, "", "none"):
        return None
    if resume_from != "auto":
        path = Path(resume_from)
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {MARKER} marker)")
        return path
    root = checkpoint_root(output_dir)
    complete = complete_checkpoints(root)
    for p in sorted(root.glob("step_*")) if root.exists() else []:
        if p not in complete:
            print0(f"[checkpoint] WARNING: ignoring incomplete checkpoint {p} (no {MARKER} marker: interrupted while saving)")
    return complete[-1] if complete else None


class _RowIndex:
    """Which rank file holds which rows of each tensor (from the files' metadata); reads go straight
    into the destination tensor (tulu.tensorfile), so loading needs no memory beyond the model."""

    def __init__(self, files: list[Path]):
        self.files = [TensorFile(f) for f in files]
        self.rows = [json.loads(f.metadata["rows"]) for f in self.files]

    def read_into(self, name: str, dst: torch.Tensor, start: int) -> None:
        """dst <- global rows start:start+len(dst) of `name`, from whichever files hold them."""
        if dst.ndim == 0:
            return self.files[0].read_rows(name, dst)
        stop, covered = start + dst.shape[0], 0
        for f, rows in zip(self.files, self.rows):
            if name not in rows:
                continue
            first, _ = rows[name]
            lo, hi = max(start, first), min(stop, first + f.shape(name)[0])
            if hi > lo:
                f.read_rows(name, dst[lo - start:hi - start], lo - first)
                covered += hi - lo
        if covered != stop - start:
            raise KeyError(f"checkpoint has {covered} of rows {start}:{stop} of {name!r}")

    def read_scalar(self, name: str) -> torch.Tensor:
        """A 0-d tensor every rank saved whole (AdamW's step)."""
        return self.files[0].read(name)

    def close(self) -> None:
        for f in self.files:
            f.close()


@torch.no_grad()
def load_checkpoint(path: Path, modules: dict, d) -> dict:
    """Load every registered model and optimizer from `path` (any writer world size) and, when the
    world size is unchanged, this rank's RNG state. Returns the trainer_state dict."""
    start = time.perf_counter()
    state = json.loads((path / "trainer_state.json").read_text())
    for prefix, (model, optimizer) in modules.items():
        index = _RowIndex(sorted(path.glob(f"{prefix}-rank*.safetensors")))
        fused = optimizer is not None and any(g.get("fused") for g in optimizer.param_groups)
        for name, p in model.named_parameters():
            local, row0 = local_rows(p)
            if local.numel():
                index.read_into(name, local, row0)
            if optimizer is None or f"{name}::step" not in index.rows[0]:
                continue
            st = optimizer.state[p]
            step = index.read_scalar(f"{name}::step").to(torch.float32)
            st["step"] = step.to(p.device) if fused else step.cpu()
            for key in ("exp_avg", "exp_avg_sq"):  # every row is read: reuse the state's memory, or allocate
                if key not in st or st[key].shape != p.shape:
                    st[key] = torch.empty_like(p)
                dst, r0 = local_rows(st[key])
                if dst.numel():
                    index.read_into(f"{name}::{key}", dst, r0)
        index.close()
    if state.get("world") == d.world:
        with TensorFile(_rank_file(path, "rng", d.rank)) as f:
            torch.set_rng_state(f.read("cpu"))
            if torch.cuda.is_available() and "cuda" in f.keys():
                torch.cuda.set_rng_state(f.read("cuda"))
    else:
        print0(f"[checkpoint] world size {state.get('world')} -> {d.world}: data position and weights carry over; "
               "per-rank RNG streams are reseeded")
    print0(f"[checkpoint] resumed from {path} (step {state['step']}, {state.get('samples_seen')} samples seen; "
           f"{time.perf_counter() - start:.1f} s)")
    return state


def restore_scheduler(scheduler, step: int) -> None:
    """Put a LambdaLR at optimizer step `step` (its lr is a pure function of the step)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


class StopRequest:
    """SIGTERM/SIGINT set a flag instead of killing the process; the loop finishes its optimizer
    step, agrees with the other ranks (`agreed`), saves and exits 0. A second signal falls back to
    the default action."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def agreed(self) -> bool:
        """Whether any rank has been asked to stop. Every rank calls it at the same point of each step:
        one all-reduce of a host tensor (gloo, which runs beside NCCL on GPU), so it never waits for
        the device's queue of work."""
        flag = torch.tensor([float(self.requested)])
        return bool(all_reduce(flag, "max").item())


def maybe_resume(args, modules: dict, schedulers: list, global_batch: int, d, optimizer_steps_per_step: int = 1) -> int:
    """Resume as the CheckpointArgs say (newest complete checkpoint under output_dir by default) and
    return the training step to start from (0 for a fresh run); each scheduler is put at that step's
    optimizer step. The data position is kept in samples (prompts in RLVR), so the global batch may be
    laid out differently (another world size) but not resized."""
    path = find_resume_point(args.output_dir, None if args.overwrite_output_dir else args.resume_from_checkpoint)
    if path is None:
        return 0
    state = load_checkpoint(path, modules, d)
    if state["samples_seen"] % global_batch:
        raise ValueError(f"{path}: {state['samples_seen']} samples seen is not a whole number of steps of the new "
                         f"global batch {global_batch}; keep per_device·grad_accum·world the same")
    step = state["samples_seen"] // global_batch
    for scheduler in schedulers:
        restore_scheduler(scheduler, step * optimizer_steps_per_step)
    return step


def maybe_save(args, completed: int, steps_per_epoch: int, stopping: bool, modules: dict, global_batch: int, d,
               export=None, extra_state: dict | None = None) -> Path | None:
    """Save after training step `completed` when the script's Args say so (`should_save`) or a stop was
    requested (then also say how to resume); `export(folder)` also writes a Hugging Face copy with
    --save_hf_every_checkpoint."""
    if not (stopping or args.should_save(completed, steps_per_epoch)):
        return None
    state = {"samples_seen": completed * global_batch, "epoch": completed / steps_per_epoch, **(extra_state or {})}
    path = save_checkpoint(args.output_dir, completed, modules, state, d, args.keep_last_n_checkpoints)
    if args.save_hf_every_checkpoint and export is not None:
        export(path.parent / f"hf_{path.name}")
    if stopping:
        print0(f"[checkpoint] stopped by signal after step {completed}; resume with the same command "
               f"(--resume_from_checkpoint auto) or --resume_from_checkpoint {path}")
    return path
