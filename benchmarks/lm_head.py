"""LM-head memory and speed: one SFT step and one DPO step, chunked (tulu/lm_head.py) against the full
logits, side by side, on a narrow model with Llama 3's vocabulary.

    python benchmarks/lm_head.py                   # hidden 256, 2 layers, V = 128,256, T = 4,096
    python benchmarks/lm_head.py --tokens 1024 --layers 1      # the CI smoke size

The model is a LlamaForCausalLM with untied embeddings, fp32 on CPU (the trainers' CPU dtype). Each
(stage, path) runs in a fresh process: one warm-up step, then `--steps` timed steps. Reported: the
step's peak resident memory above what the process held before it (VmHWM, reset through
/proc/self/clear_refs, as benchmarks/checkpoint.py counts it), tokens/s (median step), and the size
of one full fp32 logits tensor for scale. SFT: one row of T tokens, the script's token-mean
cross-entropy (tulu.losses). DPO: T/2 tokens for chosen and T/2 for rejected, padded, one forward
(tulu.preference.pair_logps), the DPO loss against fixed reference log-probs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one(stage: str, chunked: bool, a) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from checkpoint import _status_kib  # benchmarks/ is this script's folder: /proc/self/status fields
    from tulu.lm_head import head_logprobs, next_token_targets
    from tulu.losses import dpo_loss, sft_loss, sft_loss_from_logprobs
    from tulu.preference import collate_dpo_pairs, pair_logps
    from tulu.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 3, num_hidden_layers=a.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=a.tokens)
    model = LlamaForCausalLM(config)
    T, cpu = a.tokens, torch.device("cpu")
    if stage == "sft":
        ids = torch.randint(3, a.vocab, (1, T))
        labels = ids.clone()
        labels[:, : T // 4] = -100  # a prompt
        targets = next_token_targets(labels)
        n = float((targets != -100).sum())

        def step():
            if chunked:
                ce_sum, _ = sft_loss_from_logprobs(head_logprobs(model, {"input_ids": ids}, targets, chunk=a.chunk)[0],
                                                   targets)
            else:
                ce_sum, _ = sft_loss(model(input_ids=ids).logits, labels)
            (ce_sum / n).backward()  # the token mean
    else:
        half = T // 2
        prompt = torch.randint(3, a.vocab, (half // 4,)).tolist()
        c, r = (torch.randint(3, a.vocab, (half - len(prompt),)).tolist() for _ in range(2))
        batch = collate_dpo_pairs([{"chosen_input_ids": prompt + c, "chosen_labels": [-100] * len(prompt) + c,
                                "rejected_input_ids": prompt + r, "rejected_labels": [-100] * len(prompt) + r}], 0,
                              packed=False)
        ref = torch.tensor([-1.0]), torch.tensor([-1.2])

        def step():
            lp = pair_logps(model, batch, cpu, chunked=chunked)
            loss, _ = dpo_loss(lp["chosen"], lp["rejected"], *ref, beta=0.1)
            loss.backward()

    step()  # warm-up (allocator, kernels)
    model.zero_grad(set_to_none=False)
    times, peaks = [], []
    for _ in range(a.steps):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        rss0 = _status_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append((_status_kib("VmHWM") - rss0) / 1024)
        model.zero_grad(set_to_none=False)
    return {"stage": stage, "path": "chunked" if chunked else "full", "peak_mib": max(peaks),
            "tokens_per_s": T / statistics.median(times), "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("STAGE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1] == "chunked", a)))
        return
    flags = [f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "vocab", "tokens", "chunk", "steps")]
    rows = {}
    for stage in ("sft", "dpo"):
        for path in ("full", "chunked"):
            proc = subprocess.run([sys.executable, __file__, *flags, "--one", stage, path], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"{stage} {path} failed:\n{proc.stderr[-3000:]}")
            rows[stage, path] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[stage, path]), flush=True)
    logits_mib = a.tokens * a.vocab * 4 / 2**20
    print(f"\n### LM head: hidden {a.hidden}, {a.layers} layers, V = {a.vocab:,}, T = {a.tokens:,} tokens per step, "
          f"fp32, chunk {a.chunk} (one full fp32 logits tensor: {logits_mib:,.0f} MiB)\n")
    print("| step | full: peak MiB | chunked: peak MiB | peak ratio | full: tokens/s | chunked: tokens/s | speed ratio |")
    print("|---|---|---|---|---|---|---|")
    for stage in ("sft", "dpo"):
        f, c = rows[stage, "full"], rows[stage, "chunked"]
        print(f"| {stage.upper()} | {f['peak_mib']:,.0f} | {c['peak_mib']:,.0f} | {f['peak_mib'] / c['peak_mib']:.1f}x | "
              f"{f['tokens_per_s']:,.0f} | {c['tokens_per_s']:,.0f} | {c['tokens_per_s'] / f['tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
