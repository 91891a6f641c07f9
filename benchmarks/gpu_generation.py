"""TorchEngine generation throughput (part of benchmarks/gpu_suite.sh): sampled tokens per second.

    python benchmarks/gpu_generation.py --shape llama-1b              # on a GPU: 1B-shaped random weights, bf16
    python benchmarks/gpu_generation.py --shape tiny --prompts 4 --max_tokens 8   # CPU smoke

A Llama-shaped folder with random weights (benchmarks/sft_throughput.write_random_model; "tiny" =
the embedded tiny model) is loaded by rollout.engine.TorchEngine, which decodes `--prompts` random
prompts of `--prompt_len` tokens, `--n` samples each, exactly `--max_tokens` new tokens (no stop
tokens: a fixed amount of work per call), temperature 1. Reported: the median over
`--reps` timed calls after one warm-up call, in new tokens per second. The GPU numbers were written
on a machine without a GPU and have not been run (untested).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclasses.dataclass
class Args:
    shape: str = "llama-1b"
    """tulu.memory shape ("tiny" = the embedded tiny model)"""
    prompts: int = 64
    """prompts per generate() call"""
    n: int = 4
    """samples per prompt (rows = prompts·n, decoded max_batch_rows at a time)"""
    prompt_len: int = 256
    """tokens per prompt"""
    max_tokens: int = 512
    """new tokens per sample"""
    max_batch_rows: int = 256
    """TorchEngine rows per decode batch"""
    reps: int = 3
    """timed calls (after one warm-up call)"""
    model_dir: str = "/tmp/tulu_bench_models"
    """where the random-weight folder is written"""


def main(args: Args) -> None:
    import torch

    from rollout.engine import SamplingParams, TorchEngine
    from sft_throughput import write_random_model
    from tulu.tiny import tiny_dir

    cuda = torch.cuda.is_available()
    if args.shape == "tiny":
        path = tiny_dir()
    else:
        path = Path(args.model_dir) / f"{args.shape}-all"
        write_random_model(path, args.shape)
    engine = TorchEngine(str(path), device="cuda" if cuda else "cpu", dtype="bf16" if cuda else "fp32",
                         max_batch_rows=args.max_batch_rows)
    g = torch.Generator().manual_seed(0)
    vocab = min(engine.model.config.vocab_size, 500)
    prompts = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1,
                            stop_token_ids=())  # no stop token: exactly max_tokens each, fixed work per call
    engine.generate(prompts[: max(1, args.prompts // 8)], params)  # warm-up
    times = []
    for _ in range(args.reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    new = sum(len(c.token_ids) for per_prompt in out for c in per_prompt)
    dev = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n### TorchEngine generation ({dev}, {'bf16' if cuda else 'fp32'})\n")
    print("| model | prompts × n | prompt len | new tokens | rows/batch | s (median) | new tokens/s |")
    print("|---|---|---|---|---|---|---|")
    s = statistics.median(times)
    print(f"| {args.shape} | {args.prompts} × {args.n} | {args.prompt_len} | {args.max_tokens} | "
          f"{args.max_batch_rows} | {s:.2f} | {new / s:.0f} |")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
