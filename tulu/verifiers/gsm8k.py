"""GSM8K verifier: the last number in the response against the number after `####`.

Rule (Tulu 3, open-instruct `ground_truth_utils.verify_gsm8k_sample` at e363290be;
GSM8K answer format from Cobbe et al. 2021, arXiv:2110.14168): take the last number
in the response, with thousands separators removed, and compare it with the final
answer of the ground truth (the text after the last `####`, or the whole string).

Where we differ from that code, on purpose:
- the comparison is numeric (exact decimal: `18.00` == `18`, `-0` == `0`), not a string
  compare, and a leading minus sign is kept (the original's regex dropped it, so the
  negative GSM8K answers failed against their own reference solutions);
- only ASCII digits count as numbers, commas are removed only as thousands separators
  (`1,234,567`), so a list `1,2,3` ends in the number 3, not 123;
- scientific notation is not read (GSM8K answers are plain integers); no float
  conversion happens anywhere, so a 1 MB run of digits is compared exactly, in linear
  time.
A response with no number scores 0.
"""

from __future__ import annotations

import re

# An optional sign, digits with optional comma thousands groups, an optional decimal
# part; or a bare decimal such as ".5". No nested quantifiers: linear time.
# A minus sign right after a digit ("5-10") is a dash, not a sign (the lookbehind).
_NUMBER = re.compile(
    r"(?<![0-9])-?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"|(?<![0-9])-?\.[0-9]+"
)


def _canonical(number: str) -> str:
    """Exact decimal canonical form: no commas, no leading/trailing zeros, `-0` -> `0`."""
    sign = "-" if number.startswith("-") else ""
    digits = number.lstrip("-").replace(",", "")
    whole, _, frac = digits.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return out if out == "0" else sign + out


def last_number(text: str) -> str | None:
    """Canonical form of the last number in `text`, or None."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return _canonical(last.group()) if last else None


def gold_answer(ground_truth) -> str:
    """The canonical final answer of a GSM8K ground truth ("... #### 42" or "42")."""
    text = str(ground_truth).rsplit("####", 1)[-1].strip()
    match = _NUMBER.fullmatch(text.replace("$", "").strip())
    if match is None:
        raise ValueError(f"gsm8k ground truth has no single final number: {text[:80]!r}")
    return _canonical(match.group())


def verify_gsm8k(response: str, ground_truth) -> float:
    """1.0 when the last number of the response equals the ground truth's answer."""
    gold = gold_answer(ground_truth)
    return float(last_number(response) == gold)
