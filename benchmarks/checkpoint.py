"""Checkpoint benchmark: save, load and Hugging Face export time and rank-0 peak memory vs model size.

    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint.py                # tiny, 100m, 1b
    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint.py --sizes tiny --reps 1
    python benchmarks/checkpoint.py --sizes 100m --cold      # world of one; drop the page cache before loads

For each size, rank 0 writes a random-weight Llama folder (sft_throughput.write_random_model, bf16);
every rank builds the FSDP2 model from it (as the training scripts do) and an AdamW whose state is
filled in, so a checkpoint holds fp32 parameters plus two moments. Then, `--reps` times:
  save    tulu.checkpoint.save_checkpoint (every rank writes its rows; atomic publish)
  load    tulu.checkpoint.load_checkpoint into the same model and optimizer, after zeroing them; the
          parameters' and moments' checksums are compared with the values saved (a failed compare
          stops the benchmark)
  export  tulu.export.export_hf with `--shard_mb` shards (streamed gather to rank 0)
Reported per operation: median seconds (barrier to barrier, so the slowest rank), GB/s of bytes on
disk, and rank 0's peak memory above what it held before the operation: the peak resident set
(VmHWM, reset through /proc/self/clear_refs; it includes pages of mapped files that the kernel can
drop) and, on GPU, `torch.cuda.max_memory_allocated`. `--cold` drops the page cache before each
load (needs root); otherwise loads read back what the save just wrote, mostly from the page cache.

Sizes: tiny (tulu's embedded model, 0.87M params); 100m (99.5M); 1b = Llama-3.2-1B layers with a
32k vocabulary (1.10B params), so two ranks' fp32 parameters and AdamW state (13 GB) fit the 24 GiB
CPU sandbox.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sft_throughput import write_random_model  # benchmarks/ is this script's folder
from tulu.export import export_hf
from tulu.dist import barrier, init_dist, print0, shutdown
from tulu.fsdp import local_rows
from tulu.model import build_model, load_tokenizer
from tulu.optim import build_optimizer
from tulu.checkpoint import load_checkpoint, save_checkpoint

SIZES = {"tiny": ("tiny", None), "100m": ("llama-100m", None), "1b": ("llama-1b", 32000)}  # shape, vocab


def fill_optimizer_state(model, optimizer) -> None:
    """AdamW state as after some steps (random moments), without spending a backward on it."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        st = optimizer.state[p]
        st["step"] = torch.tensor(10.0)
        for key in ("exp_avg", "exp_avg_sq"):
            st[key] = torch.zeros_like(p)
            local, _ = local_rows(st[key])
            local.copy_(torch.rand(local.shape, generator=gen).abs() * 1e-3)


def checksums(model, optimizer) -> torch.Tensor:
    sums = []
    for p in model.parameters():
        sums.append(local_rows(p)[0].double().sum())
        for key in ("exp_avg", "exp_avg_sq"):
            sums.append(local_rows(optimizer.state[p][key])[0].double().sum())
    return torch.stack(sums).cpu()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn, device: torch.device) -> dict:
    """Run fn on every rank; seconds (slowest rank) and rank 0's peak memory above its level before."""
    barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    rss0 = _status_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu0 = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    barrier()
    out = {"s": time.perf_counter() - t0, "peak_rss_mib": (_status_kib("VmHWM") - rss0) / 1024}
    if device.type == "cuda":
        out["peak_gpu_mib"] = (torch.cuda.max_memory_allocated(device) - gpu0) / 2**20
    return out


def drop_page_cache() -> None:
    import os

    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root or without --cold")


def bench_size(size: str, work: Path, args, d, tokenizer) -> dict:
    folder = work / f"model-{size}"
    n_params = write_random_model(folder, SIZES[size][0], vocab_size=SIZES[size][1]) if d.is_main else 0
    barrier()
    model = build_model(str(folder), d.device, compute_dtype="fp32")
    optimizer = build_optimizer(model, 1e-5, 0.0)
    fill_optimizer_state(model, optimizer)
    expected = checksums(model, optimizer)
    runs: dict[str, list[dict]] = {"save": [], "load": [], "export": []}
    ckpt_bytes = export_bytes = 0
    for rep in range(args.reps):
        out_dir = work / f"run-{size}"
        runs["save"].append(measure(lambda: save_checkpoint(out_dir, rep + 1, {"model": (model, optimizer)},
                                                            {"samples_seen": 0}, d, 1), d.device))
        path = out_dir / "checkpoints" / f"step_{rep + 1}"
        ckpt_bytes = sum(f.stat().st_size for f in path.iterdir())
        with torch.no_grad():  # load must restore every value, so wipe them first
            for p in model.parameters():
                p.zero_()
                for key in ("exp_avg", "exp_avg_sq"):
                    optimizer.state[p][key].zero_()
        if args.cold and d.local_rank == 0:
            drop_page_cache()
        runs["load"].append(measure(lambda: load_checkpoint(path, {"model": (model, optimizer)}, d),
                                    d.device))
        got = checksums(model, optimizer)
        if not torch.equal(got, expected):
            raise RuntimeError(f"rank {d.rank}: {size} checkpoint did not round-trip "
                               f"(max checksum diff {(got - expected).abs().max():.3e})")
        export_dir = work / f"export-{size}"
        runs["export"].append(measure(lambda: export_hf(model, tokenizer, export_dir, d.is_main,
                                                        max_shard_bytes=args.shard_mb * 2**20), d.device))
        if d.is_main:
            export_bytes = sum(f.stat().st_size for f in export_dir.glob("model*.safetensors"))
            shutil.rmtree(export_dir)
    if d.is_main:
        shutil.rmtree(out_dir)
        shutil.rmtree(folder)
    del model, optimizer
    row = {"size": size, "params": n_params, "ranks": d.world, "checkpoint_bytes": ckpt_bytes,
           "export_bytes": export_bytes, "shard_mb": args.shard_mb, "reps": args.reps, "cold": args.cold}
    for op, rs in runs.items():
        med = sorted(rs, key=lambda r: r["s"])[len(rs) // 2]
        row[op] = {"s": statistics.median(r["s"] for r in rs),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                   **({"peak_gpu_mib": max(r["peak_gpu_mib"] for r in rs)} if "peak_gpu_mib" in med else {})}
    return row


def table(rows: list[dict]) -> str:
    gpu = any("peak_gpu_mib" in r["save"] for r in rows)
    head = ["size", "params (M)", "ranks", "ckpt GB"]
    for op in ("save", "load", "export"):
        head += [f"{op} s", f"{op} GB/s", f"{op} rank-0 peak RSS MiB"] + ([f"{op} rank-0 peak GPU MiB"] if gpu else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["size"], f"{r['params'] / 1e6:.1f}", str(r["ranks"]), f"{r['checkpoint_bytes'] / 1e9:.2f}"]
        for op in ("save", "load", "export"):
            nbytes = r["export_bytes"] if op == "export" else r["checkpoint_bytes"]
            cells += [f"{r[op]['s']:.2f}", f"{nbytes / 1e9 / r[op]['s']:.2f}", f"{r[op]['peak_rss_mib']:.0f}"]
            if gpu:
                cells.append(f"{r[op]['peak_gpu_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m", "1b"], choices=list(SIZES))
    ap.add_argument("--reps", type=int, default=2, help="save/load/export rounds per size (median seconds)")
    ap.add_argument("--shard_mb", type=int, default=512, help="export shard size")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (root only)")
    ap.add_argument("--work_dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also append the rows as JSON lines here")
    args = ap.parse_args()
    d = init_dist()
    tokenizer = load_tokenizer("tulu/tiny")
    work = Path(args.work_dir or tempfile.gettempdir()) / "tulu-ckpt-bench"
    if d.is_main:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    rows = []
    for size in args.sizes:
        rows.append(bench_size(size, work, args, d, tokenizer))
        print0(f"[bench] {size}: " + json.dumps({k: rows[-1][k] for k in ("save", "load", "export")}))
    if d.is_main:
        print(f"\n### Checkpoint save / load / export, {d.world} rank(s), {d.device.type}, export shards "
              f"{args.shard_mb} MiB{', cold page cache before loads' if args.cold else ''}\n", flush=True)
        print(table(rows), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        shutil.rmtree(work, ignore_errors=True)
    shutdown()


if __name__ == "__main__":
    main()
