"""Synthetic verifiable tasks a tiny model can learn on a CPU in minutes.

Addition and subtraction of single-digit numbers, phrased a few ways, answered as "a + b = N. The
answer is N." — checkable with the GSM8K rule (last number in the response), so the same rows serve SFT
(`messages`), preference pairs (`chosen` correct vs `rejected` whose final answer contradicts its
working), and RLVR prompts (`messages`
prompt + `ground_truth` + `dataset`="gsm8k"). Rows are generated from a seed: no files, no downloads.
The held-out split asks in a phrasing that never appears in any training split, so its accuracy
measures whether a stage's gains carry over to unseen prompts rather than memorized strings.
"""
from __future__ import annotations

import random

PHRASINGS = {
    "train": ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"),
    "eval": ("Work out {a} {op} {b}.",),
}
NAMES = {  # name -> (split, kind): the embedded datasets the mixer understands
    "tulu/synth-sft": ("train", "sft"),
    "tulu/synth-sft-eval": ("eval", "sft"),
    "tulu/synth-pref": ("train", "pref"),
    "tulu/synth-pref-eval": ("eval", "pref"),
    "tulu/synth-rlvr": ("train", "rlvr"),
    "tulu/synth-rlvr-eval": ("eval", "rlvr"),
}
DEFAULT_ROWS = {"train": 4000, "eval": 200}
# The difficulty lever: small enough that a 1M-parameter model learns some of it in a CPU minute or
# two, large enough that SFT leaves headroom for DPO and RLVR (measured on a 2-core CPU, torch 2.13:
# a 0.86M-parameter Llama on a+b with a, b in 0..99 reached 0.39 exact match after 150 s, still rising).
MAX_OPERAND = 9
# Noisy demonstrations: this fraction of SFT answers is wrong (a consistent but wrong sum), as
# imperfect human or model-written data is. Imitation learns the noise with the facts; a verifier
# reward (RLVR) and preference pairs have something to correct.
SFT_NOISE = 0.3


def _problems(split: str, n: int, seed: int):
    rng = random.Random(f"{split}-{seed}")
    while n > 0:
        a, b, op = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND), rng.choice("+-")
        n -= 1
        yield rng, a, b, op, (a + b if op == "+" else a - b)


def _answer(a: int, b: int, op: str, value: int, final: int | None = None) -> str:
    return f"{a} {op} {b} = {value}. The answer is {value if final is None else final}."


def make_rows(name: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of the embedded dataset `name` (one of NAMES) in the same format as real data."""
    split, kind = NAMES[name]
    rows = []
    for i, (rng, a, b, op, value) in enumerate(_problems(split, n or DEFAULT_ROWS[split], seed)):
        prompt = [{"role": "user", "content": rng.choice(PHRASINGS[split]).format(a=a, op=op, b=b)}]
        row = {"id": f"{name}_{i}"}
        if kind == "sft":
            shown = value + rng.choice([-1, 1]) * rng.randint(1, 3) if split == "train" and rng.random() < SFT_NOISE else value
            row["messages"] = prompt + [{"role": "assistant", "content": _answer(a, b, op, shown)}]
        elif kind == "pref":
            wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
            row["chosen"] = prompt + [{"role": "assistant", "content": _answer(a, b, op, value)}]
            # The rejected answer contradicts its own (correct) working: a preference a 1M-parameter
            # model can learn in CPU minutes, and the GSM8K rule (last number) still marks it wrong.
            row["rejected"] = prompt + [{"role": "assistant", "content": _answer(a, b, op, value, final=wrong)}]
        else:
            row.update(messages=prompt, ground_truth=str(value), dataset="gsm8k")
        rows.append(row)
    return rows


def corpus(n: int = 2000) -> list[str]:
    """Text the tiny tokenizer's BPE merges are learned from (chat markers included)."""
    texts = []
    for row in make_rows("tulu/synth-sft", n) + make_rows("tulu/synth-sft-eval", n // 10):
        user, asst = row["messages"]
        texts.append(f"<|system|>\nYou are helpful.\n<|user|>\n{user['content']}\n<|assistant|>\n{asst['content']}")
    return texts
