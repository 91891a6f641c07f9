"""Agreement with the reference implementations, on real data.

- IFEval: ours vs Google's checkers as shipped in lm-eval (`lm_eval.tasks.ifeval`), per
  instruction, strict and loose, on the 541 real IFEval prompts with responses built to
  follow or violate each of their instructions, plus the 270 real GPT-4 responses. Punkt
  tables come from ../shared/data/nltk_data, so `number_sentences` and
  `capital_word_frequency` are compared too. `nltk.download` is stubbed before lm-eval is
  imported (it calls it at import), so nothing reaches the network.
- MATH: ours vs math-verify's own pipeline (`verify(parse("$gold$"), parse(solution))`)
  on the MATH-500 reference solutions, equivalent rewritings and wrong answers.
Rates and disagreements are printed (`pytest -s`); thresholds: >= 99%.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tulu.verifiers import verify
from tulu.verifiers.ifeval import instruction_results

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.realdata, pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} absent")]

FILL = ["The garden was quiet in the early morning.", "Birds sang in the tall trees near the river.",
        "A farmer walked slowly along the old stone wall.", "Clouds drifted over the distant green hills."]


def _sentences(n: int) -> str:
    return " ".join(FILL[i % len(FILL)] for i in range(max(n, 0)))


def _count(kw: dict, key: str, relation_key: str, follow: bool) -> int:
    """A count that satisfies (or violates) `relation N`."""
    n, rel = int(kw[key]), kw[relation_key]
    ok = n if rel == "at least" else max(n - 1, 0)
    bad = max(n - 1, 0) if rel == "at least" else n
    return ok if follow else bad


def build_response(iid: str, kw: dict, prompt: str, follow: bool) -> str:
    """A response meant to follow (or violate) one instruction; lm-eval is the judge."""
    base = _sentences(3)
    if iid == "keywords:existence":
        return base + (" " + " and ".join(kw["keywords"]) + "." if follow else "")
    if iid == "keywords:frequency":
        return base + (" " + kw["keyword"]) * _count(kw, "frequency", "relation", follow)
    if iid == "keywords:forbidden_words":
        return base + ("" if follow else f" It was {kw['forbidden_words'][-1]}.")
    if iid == "keywords:letter_frequency":
        return "Text: " + " ".join(kw["letter"] * _count(kw, "let_frequency", "let_relation", follow) or ["none"])
    if iid == "language:response_language":
        return base if not follow else {"de": "Der Garten war am Morgen ganz ruhig und die Vögel sangen.",
                                        "it": "Il giardino era tranquillo e gli uccelli cantavano sugli alberi.",
                                        "pt": "O jardim estava tranquilo e os pássaros cantavam nas árvores."}.get(kw["language"], base)
    if iid == "length_constraints:number_sentences":
        return _sentences(_count(kw, "num_sentences", "relation", follow))
    if iid == "length_constraints:number_paragraphs":
        return "\n***\n".join(FILL[i % 4] for i in range(kw["num_paragraphs"] + (0 if follow else 1)))
    if iid == "length_constraints:number_words":
        return " ".join(["word"] * _count(kw, "num_words", "relation", follow))
    if iid == "length_constraints:nth_paragraph_first_word":
        paras = [FILL[i % 4] for i in range(kw["num_paragraphs"])]
        paras[kw["nth_paragraph"] - 1] = f"{kw['first_word'].capitalize() if follow else 'Well'}, " + paras[kw["nth_paragraph"] - 1]
        return "\n\n".join(paras)
    if iid == "detectable_content:number_placeholders":
        return base + "".join(f" [slot {i}]" for i in range(kw["num_placeholders"] - (0 if follow else 1)))
    if iid == "detectable_content:postscript":
        return base + (f"\n\n{kw['postscript_marker']} See you soon." if follow else "\n\nSee you soon.")
    if iid == "detectable_format:number_bullet_lists":
        return "Intro.\n" + "\n".join(f"* {FILL[i % 4]}" for i in range(kw["num_bullets"] + (0 if follow else 1)))
    if iid == "detectable_format:constrained_response":
        return "My answer is yes." if follow else "Yes, definitely."
    if iid == "detectable_format:number_highlighted_sections":
        return base + "".join(f" *part {i}*" for i in range(kw["num_highlights"] - (0 if follow else 1)))
    if iid == "detectable_format:multiple_sections":
        n = kw["num_sections"] - (0 if follow else 1)
        return "\n".join(f"{kw['section_spliter']} {i + 1}\n{FILL[i % 4]}" for i in range(n))
    if iid == "detectable_format:json_format":
        return "```json\n" + json.dumps({"text": base}) + "\n```" if follow else base
    if iid == "detectable_format:title":
        return ("<<A Quiet Garden>>\n" if follow else "A Quiet Garden\n") + base
    if iid == "combination:two_responses":
        return FILL[0] + "\n******\n" + (FILL[1] if follow else "")
    if iid == "combination:repeat_prompt":
        return (kw["prompt_to_repeat"] + "\n" if follow else "") + base
    if iid == "startend:end_checker":
        return base + (" " + kw["end_phrase"] if follow else "")
    if iid == "startend:quotation":
        return f'"{base}"' if follow else base
    if iid == "change_case:capital_word_frequency":
        return base + " WOW" * _count(kw, "capital_frequency", "capital_relation", follow)
    if iid == "change_case:english_capital":
        return base.upper() if follow else base
    if iid == "change_case:english_lowercase":
        return base.lower() if follow else base
    if iid == "punctuation:no_comma":
        return base if follow else base.replace("quiet", "quiet, calm")
    raise KeyError(iid)


@pytest.fixture(scope="module")
def lmeval():
    """lm-eval's IFEval registry, imported with nltk.download stubbed out."""
    os.environ.setdefault("NLTK_DATA", str(DATA / "nltk_data"))
    import nltk

    nltk.data.path.append(str(DATA / "nltk_data"))
    saved, nltk.download = nltk.download, lambda *a, **k: True
    try:
        from lm_eval.tasks.ifeval import instructions_registry
    finally:
        nltk.download = saved
    return instructions_registry.INSTRUCTION_DICT


def _reference(registry, row: dict, response: str, loose: bool) -> list[bool]:
    """lm-eval's per-instruction verdicts (its evaluation_lib logic, re-driven here so the
    built instruction's effective args can be read back)."""
    variants = [response]
    if loose:
        lines = response.split("\n")
        cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
        variants = cut + [r.replace("*", "") for r in cut]
    out = []
    for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
        inst = registry[iid](iid)
        inst.build_description(**{k: v for k, v in kw.items() if v})
        if "prompt" in (inst.get_instruction_args() or {}):
            inst.build_description(prompt=row["prompt"])
        out.append(any(r.strip() and inst.check_following(r) for r in variants))
    return out


def _ours_gt(registry, row: dict) -> dict:
    kwargs = [dict(k) for k in row["kwargs"]]
    for iid, kw in zip(row["instruction_id_list"], kwargs):
        if iid == "keywords:letter_frequency":  # IFEval swaps '#'/'!' for a random letter
            inst = registry[iid](iid)
            random.seed(row["key"])
            inst.build_description(**{k: v for k, v in kw.items() if v})
            kw["letter"] = inst.get_instruction_args()["letter"]
    return {"instruction_id_list": row["instruction_id_list"], "kwargs": kwargs, "prompt": row["prompt"]}


def _cases(rows: list[dict]) -> list[tuple[dict, str]]:
    cases = []
    for row in rows:
        for iid, kw in zip(row["instruction_id_list"], row["kwargs"]):
            kw = {k: v for k, v in kw.items() if v is not None}
            for follow in (True, False):
                cases.append((row, build_response(iid, kw, row["prompt"], follow)))
    return cases


def test_ifeval_agrees_with_lm_eval(lmeval):
    rows = [json.loads(line) for line in (DATA / "ifeval" / "input_data.jsonl").open()]
    gpt4 = [json.loads(line)["response"] for line in (DATA / "ifeval" / "responses_gpt4_dev.jsonl").open()]
    cases = _cases(rows) + list(zip(rows, gpt4))
    report = []
    for mode in ("strict", "loose"):
        agree = total = 0
        for row, response in cases:
            random.seed(row["key"])
            ref = _reference(lmeval, row, response, mode == "loose")
            ours = instruction_results(response, _ours_gt(lmeval, row), mode=mode)
            total += len(ref)
            agree += sum(a == b for a, b in zip(ref, ours))
            report += [(mode, row["key"], iid, b, a, response[:80])
                       for iid, a, b in zip(row["instruction_id_list"], ref, ours) if a != b]
        rate = agree / total
        print(f"\nifeval {mode}: ours vs lm-eval agree on {agree}/{total} instruction verdicts ({rate:.4f})")
        assert rate >= 0.99
    for mode, key, iid, ours, ref, head in report:
        print(f"  disagree [{mode}] key={key} {iid}: ours={ours} lm-eval={ref} response={head!r}")


def _rewrites(answer: str) -> list[tuple[str, bool]]:
    """(answer text, equivalent?) pairs built from a gold answer."""
    out = [(answer, True), (f" {answer} ", True), (answer.replace("\\frac", "\\dfrac"), True)]
    if answer.lstrip("-").isdigit():
        n = int(answer)
        out += [(f"{n}.0", True), (f"{n + 1}", False), (f"{n * 2 + 3}", False)]
    else:
        out += [(f"{answer} + 1", False)]
    return out


def test_math_agrees_with_math_verify():
    from math_verify import parse
    from math_verify import verify as mv_verify

    rows = [json.loads(line) for line in (DATA / "math500" / "dev.jsonl").open()]
    cases = [(r["solution"], r["answer"]) for r in rows]
    for r in rows:
        cases += [(f"Some work.\nThe answer is $\\boxed{{{text}}}$.", r["answer"]) for text, _ in _rewrites(r["answer"])]
    agree, disagreements = 0, []
    for response, gold in cases:
        ref = bool(mv_verify(parse(f"${gold}$"), parse(response)))
        ours = verify("math", response, gold) == 1.0
        agree += ref == ours
        if ref != ours:
            disagreements.append((gold, ours, ref, response[-80:]))
    rate = agree / len(cases)
    print(f"\nmath: ours vs math-verify agree on {agree}/{len(cases)} ({rate:.4f})")
    for gold, ours, ref, tail in disagreements:
        print(f"  disagree gold={gold!r}: ours={ours} math-verify={ref} response tail={tail!r}")
    assert rate >= 0.99
