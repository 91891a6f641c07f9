"""Verifier throughput: checks per second per core for each source on the real data, and
the slow tail (p99 / max seconds per check), plus adversarial 1 MB responses.

    python benchmarks/verifiers.py            # needs ../shared/data (see its README)
    python benchmarks/verifiers.py --repeats 3

One thread, one check at a time, so checks/s = checks/s/core (the math worker process
runs while the caller waits on it). Cases per source:
- gsm8k: each reference solution, answer-last ("So the answer is N.") and with N+1;
- math / math_strict: each MATH-500 reference solution, and with the boxed answer
  replaced by a wrong one (which forces the symbolic path);
- ifeval / ifeval_loose: the real GPT-4 responses against their IFEval prompts.
One-time start-up (NLTK tables, langdetect profiles, the math worker) is excluded.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from tulu.verifiers import verify

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def build_cases() -> dict[str, list[tuple[str, object]]]:
    gsm = _jsonl(DATA / "gsm8k" / "train.jsonl")
    cases: dict[str, list[tuple[str, object]]] = {"gsm8k": []}
    for r in gsm:
        body, gold = r["answer"].split("####")[0], r["answer"].split("####")[-1].strip()
        cases["gsm8k"] += [(f"{body}So the answer is {gold}.", r["answer"]), (f"{body}So the answer is 1{gold}.", r["answer"])]
    math_rows = _jsonl(DATA / "math500" / "dev.jsonl")
    math_cases = []
    for r in math_rows:
        wrong = re.sub(r"\\boxed\{", r"\\boxed{7+", r["solution"])
        math_cases += [(r["solution"], r["answer"]), (wrong, r["answer"])]
    cases["math"] = cases["math_strict"] = math_cases
    prompts = _jsonl(DATA / "ifeval" / "input_data.jsonl")
    responses = _jsonl(DATA / "ifeval" / "responses_gpt4_dev.jsonl")
    if_cases = [(resp["response"], {k: row[k] for k in ("instruction_id_list", "kwargs", "prompt")})
                for row, resp in zip(prompts, responses)]
    cases["ifeval"] = cases["ifeval_loose"] = if_cases
    return cases


def time_source(source: str, cases: list, repeats: int) -> dict:
    verify(source, *cases[0])  # warm-up: loads NLTK tables, langdetect profiles, math worker
    if source.startswith("ifeval"):
        verify(source, "Hello there. FINE WORDS HERE.\n* x", IF_ALL)
    times = []
    for _ in range(repeats):
        for response, truth in cases:
            t0 = time.perf_counter()
            verify(source, response, truth)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"checks": len(times), "per_s": len(times) / sum(times), "median_ms": 1e3 * statistics.median(times),
            "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))], "max_ms": 1e3 * times[-1]}


ADVERSARIAL = {
    "1MB digits": "1" * 1_000_000,
    "1MB unbalanced \\boxed{": "\\boxed{" * 140_000,
    "1MB newlines + bullet": "\n" * 1_000_000 + "* x",
    "1MB prose": ("The garden was quiet. Birds sang, loudly! " * 25_000)[:1_000_000],
    "tower 9^9^9^9^9": "\\boxed{9^{9^{9^{9^{9}}}}}",
}
IF_ALL = {"instruction_id_list": ["length_constraints:number_sentences", "change_case:capital_word_frequency",
                                  "language:response_language", "detectable_format:number_bullet_lists"],
          "kwargs": [{"num_sentences": 3, "relation": "at least"}, {"capital_frequency": 3, "capital_relation": "at least"},
                     {"language": "en"}, {"num_bullets": 1}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data folder {DATA} absent")
    print(f"{'source':<14}{'checks':>8}{'checks/s/core':>15}{'median ms':>11}{'p99 ms':>10}{'max ms':>10}")
    for source, cases in build_cases().items():
        s = time_source(source, cases, args.repeats)
        print(f"{source:<14}{s['checks']:>8}{s['per_s']:>15.1f}{s['median_ms']:>11.3f}{s['p99_ms']:>10.2f}{s['max_ms']:>10.2f}")
    print("\nadversarial responses, seconds per check:")
    for name, response in ADVERSARIAL.items():
        row = []
        for source, truth in (("gsm8k", "#### 1"), ("math", "1"), ("ifeval", IF_ALL), ("ifeval_loose", IF_ALL)):
            t0 = time.perf_counter()
            verify(source, response, truth)
            row.append(f"{source}={time.perf_counter() - t0:.3f}")
        print(f"  {name:<24}" + "  ".join(row))


if __name__ == "__main__":
    main()
