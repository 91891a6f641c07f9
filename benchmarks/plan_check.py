"""`--dry_run`'s per-rank peak against a measured one: tulu/activations.py + tulu/memory.py vs torch's
MemTracker on a real CPU training step.

    python benchmarks/plan_check.py [--sizes small,medium] [--tokens 1024,2048]

For each model size, with and without activation checkpointing and the chunked LM head, one process
builds a Llama-shaped model with random weights, shards it with our apply_fsdp (world 1, gloo, fp32:
the CPU's compute dtype), takes one AdamW step on one unpadded row, then takes a second step under
`torch.distributed._tools.mem_tracker.MemTracker`, which sees every tensor allocated (parameters,
optimizer state, gradients, activations, temporaries) and reports the peak of their sum. The plan's
number comes from the config alone. Prints a markdown table with the ratio plan / measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # Llama shapes, untied; head_dim 64, 4 query heads per kv head
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=8192),
    "medium": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, vocab_size=16384),
}
MiB = 2**20


def config(size: str):
    from transformers import LlamaConfig

    kw = SIZES[size]
    heads = kw["hidden_size"] // 64
    return LlamaConfig(**kw, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                       tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")


def measure(size: str, tokens: int, checkpointing: bool, chunked: bool) -> dict:
    """Runs in its own process (--measure): the MemTracker peak of one training step, by category."""
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import LlamaForCausalLM

    from tulu.fsdp import apply_fsdp
    from tulu.lm_head import head_logprobs, next_token_targets
    from tulu.losses import sft_loss

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(size))
    apply_fsdp(model, compute_dtype="fp32", activation_checkpointing=checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (1, tokens))  # (1, T) one unpadded row

    def step():
        if chunked:
            lp, _ = head_logprobs(model, {"input_ids": x}, next_token_targets(x))
            loss = -lp.sum() / (tokens - 1)
        else:
            ce_sum, _ = sft_loss(model(input_ids=x).logits, x)
            loss = ce_sum / (tokens - 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every later step
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    params = sum(p.numel() for p in model.parameters())
    del model, opt
    dist.destroy_process_group()
    return {"params": params, "peak": peak}


def planned(size: str, tokens: int, checkpointing: bool, chunked: bool, params: int) -> dict:
    """The plan for world 1, fp32: parameters and AdamW state (4 + 8 B/param), gradients (4 B/param,
    there only late in backward) and the step's peak (tulu/activations.py)."""
    from tulu.activations import step_memory

    step = step_memory(config(size), tokens, 4, checkpointing, chunked)
    state = 4 * params + 8 * params
    beyond = step.peak(4 * params, checkpointing)
    return {"state": state, "beyond": beyond, "total": state + beyond}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--tokens", default="1024,2048", help="one per size")
    p.add_argument("--measure", nargs=4, metavar=("SIZE", "TOKENS", "AC", "CHUNKED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        size, tokens, ac, chunked = a.measure
        print("MEASURED " + json.dumps(measure(size, int(tokens), ac == "1", chunked == "1")))
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": "29613", "OMP_NUM_THREADS": "1"}
    print("| model | tokens | AC | LM head | measured peak MiB (beyond params + AdamW) | plan MiB (beyond) | plan / measured |")
    print("|---|---|---|---|---|---|---|")
    for size, tokens in zip(a.sizes.split(","), map(int, a.tokens.split(","))):
        for ac in (False, True):
            for chunked in (False, True):
                out = subprocess.run([sys.executable, __file__, "--measure", size, str(tokens), str(int(ac)),
                                      str(int(chunked))], capture_output=True, text=True, env=env, cwd=REPO)
                line = next((x for x in out.stdout.splitlines() if x.startswith("MEASURED ")), None)
                if line is None:
                    raise SystemExit(out.stdout[-2000:] + out.stderr[-3000:])
                m = json.loads(line[len("MEASURED "):])
                plan = planned(size, tokens, ac, chunked, m["params"])
                peak = m["peak"]
                print(f"| {size} ({m['params'] / 1e6:.1f}M) | {tokens} | {'on' if ac else 'off'} | "
                      f"{'chunked' if chunked else 'full'} | {peak['Total'] / MiB:.1f} "
                      f"({(peak['Total'] - peak['PARAM'] - peak['OPT']) / MiB:.1f}) | {plan['total'] / MiB:.1f} "
                      f"({plan['beyond'] / MiB:.1f}) | {plan['total'] / peak['Total']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
