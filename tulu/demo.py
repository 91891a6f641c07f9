"""The whole recipe on the embedded default: SFT → DPO → RM → RLVR, each stage starting from the
previous stage's exported model, then a table of what each stage moved and PNG plots of its curves.

    python -m tulu.demo --output_dir output/demo [--nproc 2] [--fast]

`make demo` runs this. `--fast` shortens every stage (used by the CI test of the pipeline).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --fast: shorter SFT/DPO/RM; RLVR keeps its 100 steps (fewer sit in its early dip and show no gain).
FAST = {"sft": ["--num_train_epochs", "1"], "dpo": ["--max_train_steps", "30"], "rm": ["--max_train_steps", "40"]}


def run_stage(script: str, flags: list[str], nproc: int, log: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train" / script), *flags]
    print(f"[demo] {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")})
    if proc.returncode != 0:
        raise SystemExit(f"[demo] {script} failed (exit {proc.returncode}); see {log}:\n"
                         + "".join(open(log).readlines()[-30:]))
    return time.time() - t0


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(out: Path, stage: str, rows: list[dict], keys: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if series(rows, k)[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = series(rows, key)
        ax.plot(x, y, marker="." if len(x) < 20 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(stage)
    fig.tight_layout()
    path = out / f"{stage}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="output/demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--fast", action="store_true", help="shorter stages (CI)")
    a = p.parse_args()
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = {s: out / s for s in ("sft", "dpo", "rm", "rlvr")}
    fast = FAST if a.fast else {}
    tiny = ["--preset", "tiny"]  # later stages start from a tiny export: they ask for the tiny model's preset
    secs = {
        "sft": run_stage("sft.py", ["--output_dir", str(d["sft"]), *fast.get("sft", [])], a.nproc, out / "sft.log"),
        "dpo": run_stage("dpo.py", ["--model_name_or_path", str(d["sft"]), *tiny, "--output_dir", str(d["dpo"]),
                                    *fast.get("dpo", [])], a.nproc, out / "dpo.log"),
        "rm": run_stage("rm.py", ["--model_name_or_path", str(d["sft"]), *tiny, "--output_dir", str(d["rm"]),
                                  *fast.get("rm", [])], a.nproc, out / "rm.log"),
        "rlvr": run_stage("rlvr.py", ["--model_name_or_path", str(d["dpo"]), *tiny, "--reward_model_path", str(d["rm"]),
                                      "--output_dir", str(d["rlvr"]), "--local_rollout_batch_size", "16",
                                      "--number_samples_per_prompt", "4",  # 4 tries per prompt: more signal on CPU
                                      *fast.get("rlvr", [])], a.nproc, out / "rlvr.log"),
    }
    from tulu.evaluate import heldout_accuracy
    from tulu.tiny import tiny_dir

    acc = {"base": heldout_accuracy(str(tiny_dir())), **{s: heldout_accuracy(str(d[s])) for s in ("sft", "dpo", "rlvr")}}
    m = {s: metrics(d[s]) for s in d}
    dpo_eval = json.loads((d["dpo"] / "eval_results.json").read_text())
    rm_eval = json.loads((d["rm"] / "eval_results.json").read_text())
    _, rl_eval = series(m["rlvr"], "eval/verifiable_correct_rate")
    summary = {
        "heldout_accuracy": acc, "seconds": secs,
        "dpo_eval_rewards_accuracy": dpo_eval.get("eval/rewards/accuracy"),
        "rm_eval_accuracy": rm_eval.get("eval/rm/accuracy", rm_eval.get("accuracy")),
        "rlvr_eval_correct_rate": [rl_eval[0], rl_eval[-1]] if rl_eval else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = [plot(out, "sft", m["sft"], ["train/loss_per_token", "train/grad_norm"]),
             plot(out, "dpo", m["dpo"], ["train/loss", "train/rewards/accuracy", "train/rewards/margin"]),
             plot(out, "rm", m["rm"], ["train/rm/loss", "train/rm/accuracy", "train/loss", "train/accuracy"]),
             plot(out, "rlvr", m["rlvr"], ["objective/scores", "objective/kl", "objective/verifiable_correct_rate",
                                           "eval/verifiable_correct_rate"])]
    print("\n| stage | what | before | after | seconds |\n|---|---|---|---|---|")
    print(f"| SFT | held-out accuracy (greedy, exact answer) | {acc['base']:.3f} (tiny init) | {acc['sft']:.3f} | {secs['sft']:.0f} |")
    print(f"| DPO | held-out reward accuracy; held-out accuracy | - ; {acc['sft']:.3f} | "
          f"{summary['dpo_eval_rewards_accuracy']:.3f} ; {acc['dpo']:.3f} | {secs['dpo']:.0f} |")
    print(f"| RM | held-out pair accuracy | - | {summary['rm_eval_accuracy']:.3f} | {secs['rm']:.0f} |")
    if rl_eval:
        print(f"| RLVR | held-out verifiable correct rate; held-out accuracy | {rl_eval[0]:.3f} ; {acc['dpo']:.3f} | "
              f"{rl_eval[-1]:.3f} ; {acc['rlvr']:.3f} | {secs['rlvr']:.0f} |")
    print(f"\n[demo] plots: {', '.join(str(p) for p in plots)}; summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
