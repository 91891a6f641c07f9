"""The demo (`python -m tulu.demo`) on several seeds: held-out accuracy after each stage, the gains, the
time, and one PNG with every seed's accuracy per stage.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --out output/demo_seeds [--write_results]

Each seed is a whole demo run in its own folder (out/seed<S>). Prints a markdown table; with
--write_results it also appends the table, with the date and the command, to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="output/demo_seeds")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--write_results", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep a seed whose folder has a finished run's summary.json")
    a = ap.parse_args()
    out = Path(a.out)
    runs = {}
    for seed in a.seeds:
        folder = out / f"seed{seed}"
        if not (a.reuse and (folder / "summary.json").exists()):
            subprocess.run([sys.executable, "-m", "tulu.demo", "--seed", str(seed), "--nproc", str(a.nproc),
                            "--output_dir", str(folder)], cwd=ROOT, check=True)
        runs[seed] = json.loads((folder / "summary.json").read_text())

    from tulu.demo import plot_accuracy

    png = plot_accuracy(out / "accuracy_by_seed.png", {f"seed {s}": r["heldout_accuracy"] for s, r in runs.items()})
    rows = ["| seed | base | SFT | DPO | RLVR | DPO − SFT | RLVR − DPO | RLVR score: first / lowest / last "
            "| minutes |",
            "|---|---|---|---|---|---|---|---|---|"]  # minutes: the whole pipeline, evaluations included
    gains = {"dpo": [], "rlvr": []}
    for seed, r in runs.items():
        acc = r["heldout_accuracy"]
        gains["dpo"].append(acc["dpo"] - acc["sft"])
        gains["rlvr"].append(acc["rlvr"] - acc["dpo"])
        score = r.get("rlvr_score_first_min_last") or [float("nan")] * 3
        rows.append(f"| {seed} | {acc['base']:.3f} | {acc['sft']:.3f} | {acc['dpo']:.3f} | {acc['rlvr']:.3f} | "
                    f"{gains['dpo'][-1]:+.3f} | {gains['rlvr'][-1]:+.3f} | {score[0]:.2f} / {score[1]:.2f} / "
                    f"{score[2]:.2f} | {r['total_seconds'] / 60:.1f} |")
    rows.append(f"| mean | | | | | {sum(gains['dpo']) / len(runs):+.3f} | {sum(gains['rlvr']) / len(runs):+.3f} | | |")
    table = "\n".join(rows)
    print(table)
    print(f"plot: {png}")
    if a.write_results:
        cmd = f"python benchmarks/demo_seeds.py --seeds {' '.join(map(str, a.seeds))} --out {a.out}"
        where = f"{platform.machine()} CPU, {os.cpu_count()} cores, --nproc {a.nproc}"
        section = (f"\n## The demo on {len(runs)} seeds ({datetime.date.today()}, {where})\n\nCommand: `{cmd}` "
                   "(each seed a whole `python -m tulu.demo` run; held-out accuracy = greedy exact answers on "
                   f"the 200 held-out prompts, tulu/evaluate.py).\n\n{table}\n")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
