"""Where an RLVR step's time goes — generation, weight sync, scoring forwards, training — sync vs
async, on the tiny model (CPU, TorchEngine) or whatever --model_name_or_path points at.

    python benchmarks/rlvr_step.py [--model PATH] [--steps 20] [--nproc 2] [--algo ppo]

Runs the real train/rlvr.py twice (--async_mode False, True) and prints the medians of the
per-step timings it logs (time/*), after dropping the first 3 steps (engine warm-up, first eval).
With vLLM on a GPU, pass --engine vllm through EXTRA (e.g. EXTRA="--engine vllm").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("time/step", "time/generation", "time/wait_for_generation", "time/scoring", "time/training",
        "time/weight_sync", "time/overlap")


def run(model: str, steps: int, nproc: int, algo: str, async_mode: bool, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        episodes = steps * 16 * nproc * 4  # local_rollout_batch_size 16 x ranks x 4 samples
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train/rlvr.py"), "--model_name_or_path", model, "--algo", algo, "--num_evals", "0",
               "--async_mode", str(async_mode), "--total_episodes", str(episodes), "--output_dir", tmp,
               "--local_rollout_batch_size", "16", "--number_samples_per_prompt", "4", *extra]
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # prepended
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath})
        if proc.returncode:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step" in r][3:]
    return {k: statistics.median(r[k] for r in rows) for k in KEYS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tulu/tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "dr_grpo", "dapo", "gspo"])
    a = p.parse_args()
    extra = shlex.split(os.environ.get("EXTRA", ""))
    results = {mode: run(a.model, a.steps, a.nproc, a.algo, mode == "async", extra) for mode in ("sync", "async")}
    print(f"### RLVR step time, {a.algo}, {a.nproc} ranks, medians over steps 4-{a.steps} (seconds)\n")
    print("| mode | " + " | ".join(k.split("/")[1] for k in KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for mode, r in results.items():
        print(f"| {mode} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |")
    print(f"\nasync / sync step time: {results['async']['time/step'] / results['sync']['time/step']:.2f}")


if __name__ == "__main__":
    main()
