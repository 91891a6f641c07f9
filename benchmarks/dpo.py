"""DPO step time and peak memory: reference `cache` vs `live`, padded vs packed pairs.

Each configuration is one `torchrun --nproc_per_node N train/dpo.py` launch in a fresh child process;
peak memory = the largest max-RSS of any rank (getrusage of the waited-for descendants, so host RSS on
CPU; on GPU read torch.cuda.max_memory_allocated instead), step time = median gap between
consecutive metrics.jsonl rows (logging every step) after `--warmup` steps. The cache pass runs
before step 1 and is reported separately as the setup time (launch to first step, imports included).

    python benchmarks/dpo.py                      # tiny model, 2 ranks, CPU
    python benchmarks/dpo.py --model output/sft --nproc 1 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: extra flags
    "cache, packed": ["--reference_logprobs", "cache", "--packing", "True"],
    "cache, padded": ["--reference_logprobs", "cache", "--packing", "False"],
    "live, packed": ["--reference_logprobs", "live", "--packing", "True"],
    "live, padded": ["--reference_logprobs", "live", "--packing", "False"],
}


def launch(flags: list[str], nproc: int) -> dict:
    """Run one configuration in a child that reports its descendants' peak RSS (MiB)."""
    code = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(REPO / "train/dpo.py"), *flags]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # prepended
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=pythonpath, TOKENIZERS_PARALLELISM="false")
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(flags)}\n{proc.stderr[-3000:]}")
    rss_kib = int(proc.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    return {"start": start, "peak_rss_mib": rss_kib / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tulu/tiny")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=640)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--per_device", type=int, default=8)
    ap.add_argument("--max_seq_length", type=int, default=256)
    args = ap.parse_args()
    rows = []
    for name, extra in CONFIGS.items():
        with tempfile.TemporaryDirectory() as out:
            flags = ["--model_name_or_path", args.model, "--dataset_mixer_list", "tulu/synth-pref", str(args.pairs),
                     "--max_train_steps", str(args.steps), "--per_device_train_batch_size", str(args.per_device),
                     "--max_seq_length", str(args.max_seq_length), "--output_dir", out, "--logging_steps", "1", *extra]
            r = launch(flags, args.nproc)
            logged = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        times = [m["time"] for m in logged]
        gaps = [b - a for a, b in zip(times[args.warmup:], times[args.warmup + 1:])]
        first_step = times[0] - statistics.median(gaps)  # when step 1 began, roughly
        rows.append({"config": name, "step_s": statistics.median(gaps), "setup_s": first_step - r["start"],
                     "peak_rss_mib": r["peak_rss_mib"],
                     "tok_s_dev": statistics.median(m["perf/tokens_per_s_per_device"] for m in logged[args.warmup:]),
                     "padding": statistics.mean(m["perf/padding_fraction"] for m in logged)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, {args.nproc} ranks, {args.per_device} pairs/rank/step, {args.steps} steps (median after {args.warmup})")
    print("| config | step time (s) | tokens/s/rank | padding | setup incl. cache pass (s) | peak RSS/rank (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['step_s']:.3f} | {r['tok_s_dev']:.0f} | {r['padding']:.2f} | {r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
