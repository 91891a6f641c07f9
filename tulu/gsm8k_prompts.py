"""GSM8K's raw rows (`question`, `answer` ending in `#### N`) as RLVR prompt rows.

    python -m tulu.gsm8k_prompts ../shared/data/gsm8k/train.jsonl out.jsonl [--start 200] [--count 1000]

Each output row is what `train/rlvr.py` reads (the Tulu 3 RLVR data's columns): `messages` (one user
turn: the question), `ground_truth` (the final answer after `####`) and `dataset: gsm8k` (the verifier).
Rows are taken in file order from `--start`, so a fixed slice can stay held out (the benchmark evaluates
rows 0-199 and trains from 200 on).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tulu.mixer import write_rows
from tulu.verifiers.gsm8k import gold_answer


def gsm8k_rows(src: str | Path, start: int = 0, count: int | None = None) -> list[dict]:
    rows = []
    with open(src) as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            if count is not None and len(rows) == count:
                break
            raw = json.loads(line)
            try:
                truth = gold_answer(raw["answer"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{src}:{i + 1}: field 'answer': {e}") from e
            rows.append({"messages": [{"role": "user", "content": raw["question"]}], "ground_truth": truth,
                         "dataset": "gsm8k"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--start", type=int, default=0, help="first row (0-based) of the slice")
    p.add_argument("--count", type=int, default=None, help="rows to take (default: all from --start)")
    a = p.parse_args()
    rows = gsm8k_rows(a.src, a.start, a.count)
    print(f"{len(rows)} rows -> {write_rows(rows, a.dst)}")


if __name__ == "__main__":
    main()
