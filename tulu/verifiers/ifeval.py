"""IFEval verifier: instruction lists (Google's form) and Tulu 3 constraints.

Two ground-truth forms, as a dict or its JSON string:

- IFEval (Zhou et al. 2023, arXiv:2311.07911, `input_data.jsonl`):
  `{"instruction_id_list": [...], "kwargs": [{...}, ...], "prompt": "..."}`; the score is
  1 when every instruction is followed (IFEval's prompt-level accuracy), else 0.
  `instruction_results` gives the per-instruction verdicts.
- Tulu 3 / open-instruct: `{"func_name": "validate_word_constraint", "N": 300, ...}`,
  mapped in `ifeval_tulu.py`.

Modes, as IFEval's evaluation_lib: "strict" checks the response as is (an all-blank
response follows nothing); "loose" also tries it without its first line, its last line,
both, and each of those with every `*` removed, and passes if any variant does. A
ground truth may carry `"mode": "loose"`; the registry also has an `ifeval_loose` source.

The score is {0.0, 1.0}. Malformed ground truth (not JSON, unknown instruction id or
function, missing or ill-typed arguments) raises ValueError naming the problem.
"""

from __future__ import annotations

import json

from tulu.verifiers.ifeval_checks import CHECKS
from tulu.verifiers.ifeval_tulu import check_tulu

MODES = ("strict", "loose")


def parse_ground_truth(ground_truth) -> dict:
    """The ground truth as a dict (JSON strings decoded)."""
    if isinstance(ground_truth, str):
        try:
            ground_truth = json.loads(ground_truth)
        except ValueError as e:
            raise ValueError(f"ifeval ground truth is not JSON: {e}") from None
    if not isinstance(ground_truth, dict):
        raise ValueError(f"ifeval ground truth must be a JSON object, got {type(ground_truth).__name__}")
    return ground_truth


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-mode rewrites: as is, without the first / last / both lines, and
    each of those four with every `*` removed."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [r.replace("*", "") for r in cut]


def _instructions(gt: dict) -> list[tuple[str, dict]]:
    ids, kwargs = gt.get("instruction_id_list"), gt.get("kwargs")
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise ValueError("ifeval ground truth needs equal-length lists 'instruction_id_list' and 'kwargs'")
    out = []
    for iid, kw in zip(ids, kwargs):
        if iid not in CHECKS:
            raise ValueError(f"unknown IFEval instruction id {iid!r}; known: {sorted(CHECKS)}")
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        if iid == "combination:repeat_prompt" and "prompt_to_repeat" not in kw and "prompt" in gt:
            kw["prompt_to_repeat"] = gt["prompt"]
        out.append((iid, kw))
    return out


def _follows(check, variants: list[str]) -> bool:
    try:
        return any(r.strip() and check(r) for r in variants)
    except (TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"malformed ifeval arguments: {e}") from None


def instruction_results(response: str, ground_truth, mode: str | None = None) -> list[bool]:
    """One verdict per instruction (a Tulu 3 constraint is one instruction)."""
    gt = parse_ground_truth(ground_truth)
    mode = mode or gt.get("mode", "strict")
    if mode not in MODES:
        raise ValueError(f"unknown ifeval mode {mode!r}; expected one of {MODES}")
    variants = loose_variants(response) if mode == "loose" else [response]
    if "func_name" in gt:
        return [_follows(lambda r: check_tulu(r, gt), variants)]
    return [
        _follows(lambda r, f=CHECKS[iid], kw=kw: f(r, **kw), variants)
        for iid, kw in _instructions(gt)
    ]


def verify_ifeval(response: str, ground_truth, mode: str | None = None) -> float:
    """1.0 when the response follows every instruction of the ground truth, else 0.0."""
    return float(all(instruction_results(response, ground_truth, mode)))


def verify_ifeval_loose(response: str, ground_truth) -> float:
    return verify_ifeval(response, ground_truth, mode="loose")
