"""MATH verifier: extract the final answer, normalize it, compare for equivalence.

Extraction (Tulu 3's `verify_math_sample`, open-instruct e363290be, "flex"):
1. the content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces; also the
   `\\boxed 5` form, Hendrycks et al. 2021, arXiv:2103.03874, `last_boxed_only_string`);
2. the Minerva form "Final Answer: The final answer is X. I hope it is correct."
   (Lewkowycz et al. 2022, arXiv:2206.14858, App. D);
3. only when neither exists, the text between the last two `$`.
The strict variant accepts only (1). (open-instruct's unused `verify_strict_math_sample`
accepted only (2); the Tulu 3 issue asks for the boxed answer.) The original's last resort,
the whole response normalized, is dropped: it never matches a real answer and costs a
parse of up to a megabyte.

Comparison, in order, per candidate: Hendrycks `strip_string` normalization of both
sides equal; Minerva `normalize_final_answer` of both sides equal; else symbolic
equivalence by math-verify in a worker process with a timeout (`symbolic.py`). The
normalizers are our own implementations of the published rules, less the rules that make
different answers equal (each was a wrong answer verified as right):
- both cut at "=" (Hendrycks when the left side has at most 2 characters, Minerva always, at
  the last "="). Applied to the gold too, `\boxed{9999+x=5}` verified against `x=5`, and
  `\boxed{2x+3y=0}` against `5x - 7y + 11z + 4 = 0`; applied to the candidate alone, `x=3, y=5`
  against `5`. Here the gold is never cut, and a candidate is cut only by `assigned_value`:
  against a gold that is not an equation, `x = 5` counts as `5`, and any other equation as no
  answer (math-verify would take `9999+x=5` for 5 too);
- Hendrycks drops everything from the first `\text{ ` ("units on the right"): `5\text{ or }7`
  verified against `5`. Here only a trailing `\text{ ...}` (optionally `^2`) is dropped;
- Minerva keeps the first of several `$...$` (`$5$ or $7$` against `5`), drops every comma of a
  number (`1,2` against `12`) and every "a "/"an " (`2a + 3` against `2+3`). Here several `$...$`
  stay, only thousands separators go (`1,000`), and only the articles before a word.

Bounds: the extraction is a few linear scans from the end of the response; a candidate
or ground truth longer than `MAX_ANSWER_CHARS` is not an answer (score 0) and never
reaches the normalizer regexes or sympy.
"""

from __future__ import annotations

import re

from tulu.verifiers.symbolic import default_worker

MAX_ANSWER_CHARS = 1000
_MINERVA = "Final Answer: The final answer is"
_MINERVA_END = "I hope it is correct"


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed`/`\\fbox`; None when absent or its braces never close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0  # a box longer than any answer is not one: stop scanning early
        for k in range(j, min(len(text), j + MAX_ANSWER_CHARS + 2)):
            depth += (text[k] == "{") - (text[k] == "}")
            if depth == 0:
                return text[j + 1 : k]
        return None  # unbalanced (or too long)
    if j > i:  # "\boxed 5$": up to the next "$" or end of line
        return re.split(r"[$\n]", text[j:], maxsplit=1)[0].strip() or None
    return None


def minerva_answer(text: str) -> str | None:
    """X in the last "Final Answer: The final answer is X. I hope it is correct."."""
    start = text.rfind(_MINERVA)
    if start < 0:
        return None
    rest = text[start + len(_MINERVA) :]
    end = rest.find(_MINERVA_END)
    rest = rest[:end] if end >= 0 else rest
    answer = rest.split("\n", 1)[0].strip().removesuffix(".").strip()
    return answer or None


def last_dollar(text: str) -> str | None:
    end = text.rfind("$")
    start = text.rfind("$", 0, end) if end > 0 else -1
    if start < 0:
        return None
    return text[start + 1 : end].strip() or None


def candidates(response: str, strict: bool = False) -> list[str]:
    """Answer candidates of a response, in the order they are tried."""
    boxed = last_boxed(response)
    if strict:
        return [boxed] if boxed else []
    found = [c for c in (boxed, minerva_answer(response)) if c]
    if not found:
        found = [c for c in (last_dollar(response),) if c]
    return found


def _fix_fracs(s: str) -> str:
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac(\{[^{}]*\})([^{\\])", r"\\frac\1{\2}", s)


def hendrycks_normalize(s: str) -> str:
    """Hendrycks et al. 2021 MATH `strip_string`, rule by rule."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"),
                     ("dfrac", "frac"), ("\\left", ""), ("\\right", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{ [^{}]*\}(\^\{?\d\}?)?$", "", s)  # units written as "\text{ cm}" on the right, only there
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # (the published "x = 5" -> "5" rule is `assigned_value`, for candidates only)
    s = re.sub(r"\\sqrt([^{\\])", r"\\sqrt{\1}", s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


_MINERVA_SUBSTITUTIONS = ((".$", "$"), ("\\$", ""), ("\\ ", ""),
                          (" ", ""), ("mbox", "text"), (",\\text{and}", ","),
                          ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)


def minerva_normalize(s: str) -> str:
    """Lewkowycz et al. 2022, App. D `normalize_final_answer`, rule by rule (less the merging
    rules listed in the module docstring)."""
    s = re.sub(r"(?<![\w\\])an? (?=[A-Za-z])", "", s)  # articles before a word ("a square")
    for old, new in _MINERVA_SUBSTITUTIONS:
        s = s.replace(old, new)
    for expr in _MINERVA_REMOVED:
        s = s.replace(expr, "")
    if s.count("$") == 2:
        s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)  # the one $...$
    for cmd in ("text", "textbf", "overline", "boxed"):
        s = re.sub(r"(\\" + cmd + r"\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "")
    return s.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", s) else s  # 1,000 -> 1000; 1,2 stays


_VARIABLE = re.compile(r"\s*[A-Za-z](_\{?[A-Za-z0-9]+\}?)?\s*")


def assigned_value(s: str) -> str | None:
    """A candidate's value: "x = 5" -> "5", "5" -> "5"; None for any other equation ("9999+x=5",
    "x=3, y=5"), which is not a value."""
    lhs, eq, rhs = s.partition("=")
    if not eq:
        return s
    return rhs if "=" not in rhs and _VARIABLE.fullmatch(lhs.replace("$", "")) and rhs.strip() else None


def answers_match(candidate: str, gold: str, symbolic: bool = True) -> bool:
    """String equality after either normalization, else math-verify equivalence. The gold is
    never cut at "="; against a gold that is not an equation, only `var = value` equations count."""
    if len(candidate) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if "=" not in gold:
        candidate = assigned_value(candidate)
        if candidate is None:
            return False
    h_cand = hendrycks_normalize(candidate)
    if h_cand and h_cand == hendrycks_normalize(gold):
        return True
    m_cand, m_gold = minerva_normalize(candidate), minerva_normalize(gold)
    if m_cand and m_cand == m_gold:
        return True
    return symbolic and default_worker().equivalent(gold.strip("$ "), candidate.strip("$ "))


def verify_math(response: str, ground_truth, strict: bool = False, symbolic: bool = True) -> float:
    """1.0 when an extracted answer is equivalent to the ground truth answer."""
    gold = str(ground_truth).strip()
    if not gold:
        raise ValueError("math ground truth is empty")
    return float(any(answers_match(c, gold, symbolic) for c in candidates(response, strict)))


def verify_math_strict(response: str, ground_truth) -> float:
    """Only the last `\\boxed{}` answer counts."""
    return verify_math(response, ground_truth, strict=True)
