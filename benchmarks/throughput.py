"""Throughput side by side: our train/sft.py and train/dpo.py against TRL's SFTTrainer and DPOTrainer.

    /work/bench-venv/bin/python benchmarks/throughput.py         # with trl (the `bench` extra) installed
    python benchmarks/throughput.py                               # without trl: our columns only
    python benchmarks/throughput.py --steps 2 --rounds 1 --max_seq_length 128 --examples 32 --no-dpo   # smoke

Same tiny model folder (tulu.tiny.tiny_dir()), same data file (a local .jsonl of synthetic chats with
log-normal token lengths like chat data; preference pairs share the prompt, chosen and rejected
answers of independent log-normal lengths), same max length, per-device batch, gradient
accumulation, learning rate and number of optimizer steps; one process each, world size 1, fp32,
the same interpreter (so the same torch and transformers) and the same torch thread count.

* Ours: `train/sft.py` / `train/dpo.py` themselves (`--logging_steps 1`); per-step tokens/s are the
  scripts' own perf/tokens_per_s_per_device (non-pad tokens over the step's wall time without logging).
* TRL: SFTTrainer / DPOTrainer run by this file in a worker process (`--trl_worker`): a callback takes
  the wall time between consecutive optimizer-step ends (data loading, collation, forward, backward,
  optimizer; TRL logging is pushed out of the window with logging_steps=10**6), and `training_step`
  counts the non-pad tokens (attention_mask sum, or every token of a padding-free row) and the slots.
* Packing on: ours packs each step's per_device·accum examples best-fit into padding-free rows of up
  to per_device·max_seq_length tokens; TRL packs the whole dataset best-fit (`packing=True`, strategy
  bfd, padding-free) into rows of max_seq_length and takes per_device rows per micro-batch, so its
  steps hold more tokens: the table gives tokens per step for both. TRL 1.16's DPOTrainer disables
  padding_free ("temporarily unavailable after a refactor"), so DPO packed has no TRL column.
* DPO: both with a live reference model (TRL: precompute_ref_log_probs=False; ours:
  --reference_logprobs live), sigmoid loss, beta 0.1.

Medians over the steps after `--warmup` of every round; the configurations run interleaved, round
after round, so drift in the machine's load hits all of them alike.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclasses.dataclass
class Args:
    max_seq_length: int = 512
    """max tokens per sequence (TRL max_length; ours max_seq_length)"""
    per_device_train_batch_size: int = 4
    """sequences (DPO: pairs) per micro-batch"""
    gradient_accumulation_steps: int = 2
    """micro-batches per optimizer step"""
    steps: int = 6
    """optimizer steps per run"""
    warmup: int = 2
    """steps dropped from each run before taking medians"""
    rounds: int = 2
    """interleaved rounds over all configurations"""
    median_tokens: int = 128
    """median tokens of a chat (DPO: of the prompt + one answer)"""
    sigma: float = 1.0
    """log-normal sigma of the lengths"""
    examples: int = 512
    """rows in each synthetic data file"""
    sft: bool = True
    """run the SFT comparison"""
    dpo: bool = True
    """run the DPO comparison (train/dpo.py vs DPOTrainer)"""
    layouts: tuple[str, ...] = ("packed", "padded")
    """which layouts to run"""
    seed: int = 0
    """data seed"""


# ------------------------------------------------------------------------------ data


def pref_rows(tokenizer, n: int, median: int, sigma: float, max_len: int, seed: int) -> list[dict]:
    """Pairs sharing a user prompt (~30% of a chat's median length); chosen and rejected answers of
    independent log-normal lengths. Full message lists on both sides (our format; TRL extracts the
    shared prompt itself)."""
    from sft_throughput import digits, lognormal_lengths

    rng = np.random.default_rng(seed + 2)
    prompts = lognormal_lengths(n, int(0.3 * median), sigma, max_len // 2, seed)
    chosen = lognormal_lengths(n, int(0.7 * median), sigma, max_len, seed + 3)
    rejected = lognormal_lengths(n, int(0.7 * median), sigma, max_len, seed + 4)
    rows = []
    for k in range(n):
        user = [{"role": "user", "content": digits(rng, int(prompts[k]))}]
        rows.append({"id": f"pref_{k}",
                     "chosen": user + [{"role": "assistant", "content": digits(rng, int(chosen[k]))}],
                     "rejected": user + [{"role": "assistant", "content": digits(rng, int(rejected[k]))}]})
    return rows


# ------------------------------------------------------------------------------ TRL worker (runs under trl)


def trl_worker(spec: dict) -> None:
    """Train with TRL as the spec says; write [{tokens, slots, seconds}] per optimizer step to spec['out']."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tulu.tiny import tiny_dir

    path = str(tiny_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.load_dataset("json", data_files=spec["data"], split="train").remove_columns("id")
    steps: list[dict] = []
    current = {"tokens": 0, "slots": 0}

    class StepTimer(TrainerCallback):
        t = None

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            steps.append({**current, "seconds": now - self.t})
            current.update(tokens=0, slots=0)
            self.t = now

    def count(inputs: dict) -> None:
        ids = inputs.get("input_ids", inputs.get("chosen_input_ids"))
        mask = inputs.get("attention_mask")
        if spec["kind"] == "dpo" and "input_ids" not in inputs:  # older layout: chosen_*/rejected_* keys
            mask = torch.cat([inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]])
            ids = mask
        current["slots"] += int(ids.numel())
        current["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

    common = dict(output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch"],
                  gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"], learning_rate=1e-4,
                  lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, logging_steps=10**6,
                  save_strategy="no", report_to=[], use_cpu=True, seed=42, dataloader_num_workers=0,
                  max_length=spec["max_len"], disable_tqdm=True,
                  # ours runs fp32 on CPU: TRL too. TRL 1.16's SFTConfig/DPOConfig default to bf16=True, which
                  # with use_cpu means bf16 autocast, and on a CPU without native bf16 (AVX2) a crawl.
                  bf16=False, fp16=False)
    if spec["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        class Trainer(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                count(inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        config = SFTConfig(packing=spec["packing"], **common)
    else:
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                count(inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        config = DPOConfig(beta=0.1, precompute_ref_log_probs=False, padding_free=False, **common)
    extra = {}
    if spec["kind"] == "dpo":  # the live reference: a second copy of the starting weights (as ours loads it)
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    trainer = Trainer(model=model, args=config, train_dataset=ds, processing_class=tokenizer, callbacks=[StepTimer()],
                      **extra)
    trainer.train()
    Path(spec["out"]).write_text(json.dumps(steps))


# ------------------------------------------------------------------------------ launching both sides


def trl_available() -> str | None:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return None


def run_trl(kind: str, data: Path, packing: bool, args: Args) -> list[dict]:
    """Per-step dicts with perf/tokens_per_s_per_device and perf/padding_fraction, like our metrics."""
    with tempfile.TemporaryDirectory(prefix="tulu-trl-") as tmp:
        spec = dict(kind=kind, data=str(data), packing=packing, batch=args.per_device_train_batch_size,
                    accum=args.gradient_accumulation_steps, steps=args.steps, max_len=args.max_seq_length,
                    out=f"{tmp}/steps.json", out_dir=f"{tmp}/out")
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # prepended
        r = subprocess.run([sys.executable, __file__, "--trl_worker", json.dumps(spec)], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": pythonpath, "WANDB_MODE": "disabled"})
        if r.returncode != 0:
            raise RuntimeError(f"TRL {kind} worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        steps = json.loads(Path(spec["out"]).read_text())
    return [{"perf/tokens_per_s_per_device": s["tokens"] / s["seconds"], "perf/padding_fraction": 1 - s["tokens"] / max(1, s["slots"]),
             "tokens": s["tokens"]} for s in steps]


def run_ours(kind: str, data: Path, n_rows: int, packing: bool, args: Args, chunked: bool = True) -> list[dict]:
    from sft_throughput import run_script, sft_flags

    flags = sft_flags(data, n_rows, args.max_seq_length, args.per_device_train_batch_size,
                      args.gradient_accumulation_steps, args.steps, packing) + ["--chunked_lm_head", str(chunked)]
    if kind == "dpo":
        flags += ["--reference_logprobs", "live", "--dpo_loss_type", "dpo", "--dpo_beta", "0.1"]
    rows = run_script(f"{kind}.py", flags)
    # tokens of the step = tokens/s x the step's window (the same count the script divides)
    return [{**r, "tokens": None} for r in rows]


def med(runs: list[list[dict]], key: str, warmup: int) -> float:
    vals = [r[key] for rows in runs for r in rows[min(warmup, len(rows) - 1):] if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def compare(kind: str, data: Path, n_rows: int, args: Args, trl_version: str | None) -> dict:
    layouts = [lay == "packed" for lay in args.layouts]
    # ours: the chunked LM head (the default); ours_full: --chunked_lm_head false, the full logits
    configs = [(side, p) for p in layouts for side in ("ours", "ours_full", "trl")
               if side != "trl" or (trl_version and not (kind == "dpo" and p))]
    runs: dict = {c: [] for c in configs}
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for side, p in configs:
            runs[side, p].append(run_trl(kind, data, p, args) if side == "trl" else
                                 run_ours(kind, data, n_rows, p, args, chunked=side == "ours"))
    wall = time.perf_counter() - t0
    name = {"sft": "SFT: train/sft.py vs TRL SFTTrainer", "dpo": "DPO (live reference): train/dpo.py vs TRL DPOTrainer"}[kind]
    print(f"\n### {name}\n")
    print(f"{args.rounds} interleaved rounds × {args.steps} steps, median over steps after {args.warmup} warm-up; "
          f"per-device batch {args.per_device_train_batch_size}, grad accum {args.gradient_accumulation_steps}, "
          f"max length {args.max_seq_length}; {wall:.0f} s wall; dtypes: ours fp32 (auto on CPU), "
          f"TRL fp32 (bf16=False, fp16=False)\n")
    print("| layout | ours tok/s (chunked head) | ours tok/s (full logits) | TRL tok/s | ours / TRL | "
          "ours padding frac | TRL padding frac | TRL tokens/step |")
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for p in layouts:
        ours = med(runs["ours", p], "perf/tokens_per_s_per_device", args.warmup)
        ours_pad = med(runs["ours", p], "perf/padding_fraction", args.warmup)
        full = med(runs["ours_full", p], "perf/tokens_per_s_per_device", args.warmup)
        trl = trl_pad = trl_tokens = None
        if ("trl", p) in runs:
            trl = med(runs["trl", p], "perf/tokens_per_s_per_device", args.warmup)
            trl_pad = med(runs["trl", p], "perf/padding_fraction", args.warmup)
            trl_tokens = med(runs["trl", p], "tokens", args.warmup)
        why = "n/a (trl not installed)" if not trl_version else "n/a (TRL 1.16 DPO: padding_free disabled)"
        print(f"| {'packed' if p else 'padded'} | {ours:.0f} | {full:.0f} | {f'{trl:.0f}' if trl else why} | "
              f"{f'{ours / trl:.2f}' if trl else '-'} | {ours_pad:.3f} | {f'{trl_pad:.3f}' if trl else '-'} | "
              f"{f'{trl_tokens:.0f}' if trl else '-'} |")
        out["packed" if p else "padded"] = {"ours": ours, "ours_full": full, "trl": trl}
    return out


def main(args: Args) -> None:
    import torch

    from sft_throughput import chat_rows, length_stats, write_jsonl
    from tulu.model import load_tokenizer

    version = trl_available()
    import transformers

    print(f"torch {torch.__version__}; transformers {transformers.__version__}; "
          f"trl {version or 'not installed (our columns only)'}; {os.cpu_count()} CPU cores; "
          f"torch threads {torch.get_num_threads()}")
    tokenizer = load_tokenizer("tulu/tiny")
    work = Path(tempfile.mkdtemp(prefix="tulu-throughput-"))
    try:
        if args.sft:
            rows = chat_rows(tokenizer, args.examples, args.median_tokens, args.sigma, args.max_seq_length, args.seed)
            st = length_stats(tokenizer, rows, args.max_seq_length)
            print(f"SFT data: {st['n']} chats, tokens median {st['median']}, mean {st['mean']:.0f}, p90 {st['p90']}, "
                  f"p99 {st['p99']}, max {st['max']}")
            compare("sft", write_jsonl(work / "chat.jsonl", rows), len(rows), args, version)
        if args.dpo:
            if not (ROOT / "train" / "dpo.py").exists():
                print("\n(DPO: train/dpo.py not found; skipped)")
            else:
                rows = pref_rows(tokenizer, args.examples, args.median_tokens, args.sigma, args.max_seq_length, args.seed)
                compare("dpo", write_jsonl(work / "pref.jsonl", rows), len(rows), args, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--trl_worker":
        trl_worker(json.loads(sys.argv[2]))
    else:
        import tyro

        main(tyro.cli(Args))
