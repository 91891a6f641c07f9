"""Per-rank memory of our FSDP2 training against DeepSpeed ZeRO-3's estimator.

    python benchmarks/memory.py                   # real-scale simulation, DeepSpeed table, CPU measurement
    python benchmarks/memory.py --skip_measure    # the simulated tables only (~15 s)
    python benchmarks/memory.py --cpu_offload     # offloaded rows only

1. Simulated at real scale (tulu.memory.simulate_model_state: meta device, fake process group, our
   apply_fsdp and build_optimizer): Llama-3.1-8B at 8 and 64 ranks, 70B at 64, with
   apply_fsdp's wrapping (embeddings, each block, lm_head, root).
2. Against DeepSpeed's `estimate_zero3_model_states_mem_needs` (called when deepspeed imports, the
   same formula otherwise): like for like = persistent device state + the largest unit's 16-bit
   params and grads, the two things DeepSpeed's 4L + 18P/T counts.
3. Measured: torchrun on gloo ranks; bytes of the parameter / gradient / optimizer tensors each rank
   holds after step 1 (tulu.memory.count_model_state_bytes) against the simulation for that rank.
4. With a CUDA GPU: torch.cuda.max_memory_allocated after one step (1B model; 8B with CPU offload).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tulu.memory import GiB, deepspeed_zero3_estimate, llama_config, simulate_model_state  # noqa: E402

ROWS = [("llama-3.1-8b", 8), ("llama-3.1-8b", 64), ("llama-3.1-70b", 64)]
MiB = 2**20


@dataclass
class Args:
    cpu_offload: bool = False
    """only the rows with parameters, gradients and optimizer state offloaded to the CPU"""
    skip_measure: bool = False
    """skip the torchrun measurements on CPU"""
    measure_shapes: tuple[str, ...] = ("tiny", "llama-100m")
    """shapes measured on gloo ranks"""
    measure_ranks: tuple[int, ...] = (1, 2, 4)
    """world sizes measured"""


def deepspeed_estimate(P: int, L: int, world: int, offload: bool) -> tuple[int, str]:
    """DeepSpeed's own number when it imports (checked against our copy of the formula)."""
    ours = deepspeed_zero3_estimate(P, L, world, cpu_offload=offload)
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return ours, "formula (deepspeed/runtime/zero/stage3.py)"
    ds = estimate_zero3_model_states_mem_needs(P, L, num_gpus_per_node=8, num_nodes=world // 8,
                                               cpu_offload=offload, cpu_offload_params=offload)[1]
    assert ds == ours, (ds, ours)
    return ds, f"deepspeed {deepspeed.__version__}"


def gib(b: int) -> str:
    return f"{b / GiB:.2f}"


def simulated_tables(offloads: tuple[bool, ...]) -> None:
    plans = {}
    t0 = time.perf_counter()
    for shape, world in ROWS:
        for off in offloads:
            plans[shape, world, off] = simulate_model_state(llama_config(shape), world, compute_dtype="bf16",
                                                            cpu_offload=off)
    print(f"### Simulated per-rank memory, GiB (bf16 compute, fp32 master/grads/AdamW; "
          f"{len(plans)} simulations in {time.perf_counter() - t0:.1f} s)\n")
    print("| model | ranks | offload | params | grads | optim | model state | on device | "
          "largest unit (M params) | unit bf16 params + grads | + fp32 reduce-scatter: device peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (shape, world, off), p in plans.items():
        print(f"| {shape} | {world} | {'cpu' if off else 'none'} | "
              f"{gib(p.param_bytes)} | {gib(p.grad_bytes)} | {gib(p.optim_bytes)} | {gib(p.model_state_bytes)} | "
              f"{gib(p.device_state_bytes)} | {p.largest_unit or '<root>'} ({p.largest_unit_params / 1e6:.0f}) | "
              f"{gib(p.unit_param_bytes + p.unit_grad_bytes)} | {gib(p.device_peak_bytes)} |")

    print("\n### Per-GPU model states vs DeepSpeed ZeRO-3 estimate, GiB "
          "(ours = on-device state + largest unit's bf16 params + grads)\n")
    print("| model | ranks | offload | P (B) | L (M) | DeepSpeed 4L + 18P/T (or 4L) | source | ours | ratio | ours ≤ DeepSpeed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape, world in ROWS:
        for off in offloads:
            p = plans[shape, world, off]
            ds, source = deepspeed_estimate(p.total_params, p.largest_module_params, world, off)
            print(f"| {shape} | {world} | {'param+optim cpu' if off else 'none'} | {p.total_params / 1e9:.3f} | "
                  f"{p.largest_module_params / 1e6:.1f} | {gib(ds)} | {source} | {gib(p.ds_comparable_bytes)} | "
                  f"{p.ds_comparable_bytes / ds:.3f} | {'yes' if p.ds_comparable_bytes <= ds else 'NO'} |")


def torchrun(nproc: int, *script_args: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "tests/scripts/memory_measure.py"), *script_args, "--out", str(out)]
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # prepended
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        return [json.loads(Path(f"{out}.rank{i}.json").read_text()) for i in range(nproc)]


def measured_table(args: Args) -> None:
    print("\n### Measured on CPU (gloo) vs simulated: bytes held after the first optimizer step, rank 0 "
          "(MiB); every rank compared exactly\n")
    print("| model | params (M) | ranks | params meas / sim | grads meas / sim | optim meas / sim | "
          "ranks exactly equal | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.measure_shapes:
        for n in args.measure_ranks:
            t0 = time.perf_counter()
            measured = torchrun(n, "--shape", shape)
            wall = time.perf_counter() - t0
            plans = [simulate_model_state(llama_config(shape), n, rank=m["rank"]) for m in measured]
            equal = sum((m["params"], m["grads"], m["optim"]) == (p.param_bytes, p.grad_bytes, p.optim_bytes)
                        for m, p in zip(measured, plans))
            m, p = measured[0], plans[0]
            print(f"| {shape} | {p.total_params / 1e6:.1f} | {n} | {m['params'] / MiB:.3f} / {p.param_bytes / MiB:.3f} | "
                  f"{m['grads'] / MiB:.3f} / {p.grad_bytes / MiB:.3f} | {m['optim'] / MiB:.3f} / {p.optim_bytes / MiB:.3f} | "
                  f"{equal}/{n} | {wall:.1f} |")


def gpu_table() -> None:
    """Device peak of one step (model state + transient + activations) against the estimator. Untested:
    written on a machine without a GPU."""
    print("\n### Measured on one GPU: torch.cuda.max_memory_allocated after one step, GiB\n")
    print("| model | offload | seq | max allocated | simulated device peak (no activations) | DeepSpeed estimate |")
    print("|---|---|---|---|---|---|")
    for shape, off, seq in [("llama-1b", False, 16), ("llama-1b", False, 4096), ("llama-3.1-8b", True, 16)]:
        m = torchrun(1, "--shape", shape, "--seq_len", str(seq), *(["--cpu_offload"] if off else []))[0]
        p = simulate_model_state(llama_config(shape), 1, cpu_offload=off)
        ds = deepspeed_zero3_estimate(p.total_params, p.largest_module_params, 1, cpu_offload=off)
        print(f"| {shape} | {off} | {seq} | {gib(m['cuda_max_allocated'])} | {gib(p.device_peak_bytes)} | {gib(ds)} |")


def main(args: Args) -> None:
    print(f"torch {torch.__version__}; {os.cpu_count()} CPU cores; "
          f"{'CUDA: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n")
    simulated_tables((True,) if args.cpu_offload else (False, True))
    if not args.skip_measure:
        measured_table(args)
    if torch.cuda.is_available():
        gpu_table()


if __name__ == "__main__":
    main(tyro.cli(Args))
