"""Verifiers: registry, GSM8K, MATH, robustness, thread safety, real data.

IFEval checkers: tests/test_verifiers_ifeval.py; agreement with lm-eval and
math-verify: tests/test_verifiers_agreement.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from tulu.verifiers import VERIFIERS, strip_chat_prompt, verify, verify_batch
from tulu.verifiers.gsm8k import gold_answer, last_number
from tulu.verifiers.math_verifier import assigned_value, candidates, hendrycks_normalize, last_boxed, minerva_normalize
from tulu.verifiers.symbolic import SymbolicWorker

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
realdata = pytest.mark.realdata
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


# ---------------------------------------------------------------- registry


def test_source_names_are_case_insensitive_and_aliased():
    assert verify("GSM8K", "so 4", "#### 4") == 1.0
    assert verify("MATH", "\\boxed{4}", "4") == 1.0
    assert verify(" IFEval ", "no commas here", {"func_name": "validate_no_commas"}) == 1.0
    assert verify("hendrycks_math", "\\boxed{4}", "4") == 1.0


def test_unknown_source_lists_known_names():
    with pytest.raises(KeyError) as e:
        verify("mbpp", "x", "y")
    assert "gsm8k" in str(e.value) and "ifeval" in str(e.value)


def test_none_ground_truth_scores_zero():
    for source in VERIFIERS:
        assert verify(source, "anything 4 \\boxed{4}", None) == 0.0


@pytest.mark.parametrize(
    "source,truth",
    [("gsm8k", "#### four"), ("math", "   "), ("ifeval", "{not json"), ("ifeval", '{"func_name": "nope"}'),
     ("ifeval", {"instruction_id_list": ["keywords:nope"], "kwargs": [{}]}),
     ("ifeval", {"instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "a"}]}),
     ("ifeval", {"func_name": "validate_word_constraint", "N": 3, "quantifier": "roughly"})],
)
def test_malformed_ground_truth_is_a_clear_error(source, truth):
    with pytest.raises(ValueError):
        verify(source, "some response 4", truth)


def test_verify_batch_matches_verify_and_checks_lengths():
    sources = ["gsm8k", "math", "ifeval", "gsm8k"]
    responses = ["it is 7", "\\boxed{\\frac{1}{2}}", "HELLO, WORLD", "it is 8"]
    truths = ["#### 7", "0.5", {"func_name": "validate_no_commas"}, "#### 7"]
    assert verify_batch(sources, responses, truths) == [verify(*x) for x in zip(sources, responses, truths)]
    assert verify_batch(sources, responses, truths) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        verify_batch(sources, responses, truths[:2])


def test_strip_chat_prompt():
    text = "<|user|>\nWhat is 2+2? Answer 5\n<|assistant|>\nIt is 4 "
    assert strip_chat_prompt(text) == "It is 4"
    assert verify("gsm8k", strip_chat_prompt(text), "#### 4") == 1.0
    assert strip_chat_prompt("plain") == "plain"


# ---------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "response,expected",
    [("The answer is 1,234.", "1234"), ("-3 degrees", "-3"), ("costs $18.00.", "18"), ("pages 5-10", "10"),
     ("a list 1,2,3", "3"), ("0.50", "0.5"), ("-0", "0"), ("no digits", None), ("x = .5", "0.5"),
     ("٣ (arabic-indic three)", None), ("1e5", "5")],
)
def test_gsm8k_last_number(response, expected):
    assert last_number(response) == expected


def test_gsm8k_verdicts():
    assert verify("gsm8k", "So she has 18 apples.", "She has ... #### 18") == 1.0
    assert verify("gsm8k", "So she has $18.00.", "#### 18") == 1.0
    assert verify("gsm8k", "It is 18, checked 3 ways", "#### 18") == 0.0  # last number wins
    assert verify("gsm8k", "The temperature fell to -10.", "#### -10") == 1.0
    assert verify("gsm8k", "The temperature fell to 10.", "#### -10") == 0.0
    assert verify("gsm8k", "", "#### 1") == 0.0
    assert gold_answer("#### 1,000") == "1000"
    big = "9" * 5000
    assert verify("gsm8k", f"huge {big}", f"#### {big}") == 1.0
    assert verify("gsm8k", f"huge {big}8", f"#### {big}") == 0.0


# ---------------------------------------------------------------- math


def test_last_boxed_forms():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("so $\\boxed 5$.") == "5"
    assert last_boxed("\\fbox{x+1}") == "x+1"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("unbalanced \\boxed{1 + {2}") is None
    assert last_boxed("nothing") is None


def test_candidates_flex_and_strict():
    minerva = "Work.\nFinal Answer: The final answer is $\\frac{3}{4}$. I hope it is correct."
    assert candidates(minerva) == ["$\\frac{3}{4}$"]
    assert candidates(minerva, strict=True) == []
    assert candidates("we get $x = 5$ in the end") == ["x = 5"]
    assert candidates("\\boxed{2}\nFinal Answer: The final answer is 3.") == ["2", "3"]


def test_normalizers():
    assert hendrycks_normalize("\\dfrac12") == hendrycks_normalize("\\frac{1}{2}")
    assert hendrycks_normalize("x = 5") == "x=5"  # never cut at "=" (that is assigned_value, for candidates)
    assert hendrycks_normalize("10\\%") == "10"
    assert hendrycks_normalize("3\\text{ cm}^2") == "3" and hendrycks_normalize("5\\text{ or }7") != "5"
    assert minerva_normalize("5 \\text{ inches}") == "5"
    assert minerva_normalize("1,000") == "1000" and minerva_normalize("1,2") == "1,2"
    assert minerva_normalize("an octagon") == "octagon" and minerva_normalize("2a + 3") == "2a+3"
    assert assigned_value("x = 5") == " 5" and assigned_value("a_1=3") == "3" and assigned_value("7") == "7"
    assert assigned_value("9999+x=5") is None and assigned_value("x=3, y=5") is None and assigned_value("x=") is None


@pytest.mark.parametrize("response,truth,expected", [
    # an equation gold: right
    ("\\boxed{x=5}", "x=5", 1.0), ("\\boxed{x = 5}", "x=5", 1.0), ("\\boxed{5}", "x=5", 1.0),
    ("\\boxed{5x-7y+11z+4=0}", "5x - 7y + 11z + 4 = 0", 1.0),
    # an equation gold: wrong, and the same right-hand side with another left-hand side
    ("\\boxed{x=6}", "x=5", 0.0), ("\\boxed{9999+x=5}", "x=5", 0.0), ("\\boxed{y=5}", "x=5", 0.0),
    ("\\boxed{2x+3y=0}", "5x - 7y + 11z + 4 = 0", 0.0), ("\\boxed{0}", "5x - 7y + 11z + 4 = 0", 0.0),
    # a value gold: an assignment counts as its value, no other equation does
    ("\\boxed{x = 5}", "5", 1.0), ("\\boxed{9999+x=5}", "5", 0.0), ("\\boxed{x=3, y=5}", "5", 0.0),
    ("\\boxed{x+1=5}", "5", 0.0),
    # the other normalization rules that merged different answers
    ("\\boxed{1,2}", "12", 0.0), ("\\boxed{12}", "1,2", 0.0), ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{5\\text{ or }7}", "5", 0.0), ("\\boxed{3\\text{ cm}}", "3", 1.0),
    ("Final Answer: The final answer is $5$ or $7$. I hope it is correct.", "5", 0.0),
    # a list matches whole (the original's parse_latex read only its first item: "3" equalled "3, 5, 7")
    ("\\boxed{3}", "3, 5, 7", 0.0), ("\\boxed{3, 5, 7}", "3, 5, 7", 1.0),
])
def test_math_accepts_no_wrong_answer(response, truth, expected):
    """Each 0.0 here verified as right before (the gold cut at "=" like the candidate, and the
    merging rules of the published normalizers; see tulu/verifiers/math_verifier.py)."""
    assert verify("math", response, truth) == expected


@pytest.mark.parametrize(
    "response,truth,expected",
    [("\\boxed{\\dfrac{9}{7}}", "\\frac{9}{7}", 1.0), ("\\boxed{0.5}", "\\frac12", 1.0),
     ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0), ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
     ("\\boxed{10^\\circ}", "10", 1.0), ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}", 1.0),
     ("\\boxed{3}", "4", 0.0), ("\\boxed{x+1}", "x-1", 0.0), ("no answer at all", "4", 0.0),
     ("Final Answer: The final answer is $12$. I hope it is correct.", "12", 1.0)],
)
def test_math_verdicts(response, truth, expected):
    assert verify("math", response, truth) == expected


def test_math_strict_needs_a_box():
    minerva = "Final Answer: The final answer is 12. I hope it is correct."
    assert verify("math", minerva, "12") == 1.0
    assert verify("math_strict", minerva, "12") == 0.0
    assert verify("math_strict", "so \\boxed{12}", "12") == 1.0


# ---------------------------------------------------------------- robustness


ADVERSARIAL = [
    "", " ", "\x00\ud7ff\U0001f600 émoji ñ 中文", "{" * 100_000, "}" * 100_000, "\\boxed{" * 50_000,
    "\\boxed{" + "{" * 10_000 + "1", "$" * 100_000, "1" * 1_000_000, "[" * 1_000_000, "<<" * 200_000,
    "\n" * 500_000 + "* x", " \n" * 300_000 + "-", "*" * 500_000, "Final Answer: The final answer is " * 20_000,
    "a" * 1_000_000, ("word, " * 200_000)[:1_000_000],
]


def test_adversarial_responses_score_without_crash_or_hang():
    truths = {"gsm8k": "#### 1", "math": "1", "math_strict": "1"}
    start = time.perf_counter()
    for response in ADVERSARIAL:
        for source, truth in truths.items():
            assert verify(source, response, truth) in (0.0, 1.0)
    assert time.perf_counter() - start < 20


def test_symbolic_blowup_is_cut_by_the_timeout():
    worker = SymbolicWorker(timeout=1.0)
    try:
        assert worker.equivalent("2", "1+1")  # warm start
        start = time.perf_counter()
        slow = worker.equivalent("3", "9^{9^{9^{9^{9^{9}}}}}")
        assert not slow and time.perf_counter() - start < 5
        assert worker.equivalent("\\frac{1}{2}", "0.5")  # still (or again) serving
    finally:
        worker.close()


def test_worker_restarts_after_being_killed():
    worker = SymbolicWorker(timeout=2.0)
    try:
        assert worker.equivalent("4", "2+2")
        worker._proc.kill()
        worker._proc.wait()
        assert worker.equivalent("4", "2\\cdot2")
    finally:
        worker.close()


def test_response_is_never_executed():
    evil = "\\boxed{__import__('os').system('touch /tmp/tulu_pwned')}"
    assert verify("math", evil, "0") == 0.0
    assert not Path("/tmp/tulu_pwned").exists()


def test_verify_from_many_threads_matches_serial():
    cases = [("math", f"\\boxed{{\\frac{{{i}}}{{{2 * i}}}}}", "0.5") for i in range(1, 9)]
    cases += [("gsm8k", f"so {i}", f"#### {i % 3}") for i in range(8)]
    cases += [("ifeval", "a, b" if i % 2 else "a b", {"func_name": "validate_no_commas"}) for i in range(8)]
    serial = [verify(*c) for c in cases]
    results = [None] * len(cases)

    def run(i):
        results[i] = verify(*cases[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == serial


# ---------------------------------------------------------------- real data


@realdata
@needs_data
def test_gsm8k_reference_solutions_verify():
    rows = _jsonl(DATA / "gsm8k" / "train.jsonl")
    full = sum(verify("gsm8k", r["answer"], r["answer"]) for r in rows) / len(rows)
    # The Tulu 3 few-shot style: worked solution, then "So the answer is N."
    styled = [re.sub(r"<<[^>]*>>", "", r["answer"].split("####")[0]) + f"So the answer is {r['answer'].split('####')[-1].strip()}." for r in rows]
    rate = sum(verify("gsm8k", s, r["answer"]) for s, r in zip(styled, rows)) / len(rows)
    print(f"gsm8k reference solutions verified: full {full:.4f}, answer-last {rate:.4f} of {len(rows)}")
    assert full >= 0.99 and rate >= 0.99
    wrong = [s[: s.rfind("is ")] + f"is {int(gold_answer(r['answer'])) + 1}." for s, r in zip(styled[:2000], rows)]
    assert sum(verify("gsm8k", w, r["answer"]) for w, r in zip(wrong, rows)) == 0


@realdata
@needs_data
def test_math_reference_solutions_verify():
    rows = _jsonl(DATA / "math500" / "dev.jsonl")
    rate = sum(verify("math", r["solution"], r["answer"]) for r in rows) / len(rows)
    strict = sum(verify("math_strict", r["solution"], r["answer"]) for r in rows) / len(rows)
    print(f"math reference solutions verified: flex {rate:.4f}, strict {strict:.4f} of {len(rows)}")
    assert rate >= 0.99 and strict >= 0.99
    numeric = [r for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    for r in numeric:
        wrong = r["solution"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
        assert verify("math", wrong, r["answer"]) == 0.0, r["unique_id"]


@realdata
@needs_data
def test_math_rejects_wrong_answers_built_from_every_gold():
    """Wrong answers that keep the gold's value in sight: another left-hand side for the same right
    one, an equation ending in the gold, a hedge. 1,247 of these verified before this check."""
    accepted = []
    for r in _jsonl(DATA / "math500" / "dev.jsonl"):
        gold = r["answer"]
        if "=" in gold:
            lhs, _, rhs = gold.rpartition("=")
            wrong = [f"9999+{gold}", f"z+{lhs.strip()}+1={rhs}", f"{lhs}+1={rhs}"]
        else:
            wrong = [f"{gold}+1", f"9999+x={gold}", f"x=3, y={gold}", f"{gold}\\text{{ or }}9999", f"x+1={gold}"]
        responses = [f"so \\boxed{{{w}}}" for w in wrong]
        responses.append(f"Final Answer: The final answer is ${gold}$ or $9999$. I hope it is correct.")
        accepted += [(r["unique_id"], x) for x in responses if verify("math", x, gold)]
    assert accepted == [], accepted[:10]
