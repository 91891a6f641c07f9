"""On-policy preference pairs, as Tulu 3 built its preference data: the model's own completions for
training prompts, a verified-correct one chosen over a wrong one (Tulu 3 judged with an LLM; here the
verifier RLVR rewards with, so the pairs say exactly what the later stages are paid for).

    python -m tulu.onpolicy output/demo/sft output/demo/pairs.jsonl [--dataset tulu/synth-rlvr] [--prompts 2000]

Completions come from the pure-torch engine (rollout/engine.py) in this process, `samples` per prompt
at `temperature`; a prompt whose samples are all right or all wrong gives no pair (it teaches nothing
a pair could). Rows are written as preference data: `chosen` and `rejected` message lists that share
the prompt, ready for train/dpo.py's --dataset_mixer_list.
"""
from __future__ import annotations

import argparse
import json

from tulu.chat import encode, render
from tulu.mixer import write_rows
from tulu.synth import make_rows
from tulu.verifiers import verify_batch


def build_pairs(model_path: str, dataset: str = "tulu/synth-rlvr", prompts: int = 2000, samples: int = 4,
                temperature: float = 1.0, max_tokens: int = 32, seed: int = 0,
                pairs_per_prompt: int = 1) -> tuple[list[dict], dict]:
    """(pair rows, stats): up to pairs_per_prompt (correct, wrong) pairs for each of `prompts` rows of
    the embedded `dataset` (prompt messages + ground truth), from `samples` completions each."""
    from rollout.engine import SamplingParams, TorchEngine
    from tulu.model import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    rows = make_rows(dataset, prompts, seed=seed)
    ids = [encode(tokenizer, render(tokenizer, r["messages"], add_generation_prompt=True)) for r in rows]
    engine = TorchEngine(str(model_path), max_batch_rows=256)
    groups = engine.generate(ids, SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens,
                                                 seed=seed))
    texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in g] for g in groups]
    flat = [t for g in texts for t in g]
    verified = verify_batch([r["dataset"] for r in rows for _ in range(samples)], flat,
                            [r["ground_truth"] for r in rows for _ in range(samples)])
    pairs, mixed = [], 0
    for i, row in enumerate(rows):
        judged = list(zip(texts[i], verified[i * samples:(i + 1) * samples]))
        right = list(dict.fromkeys(t for t, v in judged if v > 0))  # distinct texts, sampling order
        wrong = list(dict.fromkeys(t for t, v in judged if v <= 0))
        mixed += bool(right and wrong)
        for k, (good, bad) in enumerate(zip(right, wrong)):
            if k == pairs_per_prompt:
                break
            pairs.append({"id": f"{row['id']}_pair{k}",
                          "chosen": row["messages"] + [{"role": "assistant", "content": good}],
                          "rejected": row["messages"] + [{"role": "assistant", "content": bad}]})
    stats = {"prompts": len(rows), "samples": samples, "sampled_correct_rate": sum(v > 0 for v in verified) / len(flat),
             "prompts_with_a_pair": mixed, "pairs": len(pairs)}
    return pairs, stats


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_path")
    ap.add_argument("out")
    ap.add_argument("--dataset", default="tulu/synth-rlvr")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    pairs, stats = build_pairs(a.model_path, a.dataset, a.prompts, a.samples, a.temperature, seed=a.seed)
    write_rows(pairs, a.out)
    print(json.dumps(stats))
