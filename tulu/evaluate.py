"""Held-out accuracy of a model folder on the embedded synthetic task (exact answer, GSM8K rule).

    python -m tulu.evaluate output/demo/sft [--rows 200]

Greedy decoding with the pure-torch engine; the answer is verified with the same checker RLVR
rewards, so the number is comparable across stages (SFT, DPO, RLVR).
"""
from __future__ import annotations

import argparse
import json

from tulu.chat import encode, render
from tulu.synth import make_rows
from tulu.verifiers import verify_batch


def heldout_accuracy(model_path: str, rows: int = 200, max_tokens: int = 32) -> float:
    from rollout.engine import SamplingParams, TorchEngine
    from tulu.model import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    data = make_rows("tulu/synth-rlvr-eval", rows)
    prompts = [encode(tokenizer, render(tokenizer, r["messages"], add_generation_prompt=True)) for r in data]
    engine = TorchEngine(str(model_path))
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens))
    texts = [tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in out]
    verified = verify_batch([r["dataset"] for r in data], texts, [r["ground_truth"] for r in data])
    return sum(v > 0 for v in verified) / len(verified)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path")
    p.add_argument("--rows", type=int, default=200)
    a = p.parse_args()
    print(json.dumps({"model": a.model_path, "heldout_accuracy": heldout_accuracy(a.model_path, a.rows)}))
