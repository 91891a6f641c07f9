"""The Tulu 3 RLVR constraint form, mapped onto the IFEval checkers.

Tulu 3's IF rows (allenai/RLVR-IFeval) carry a JSON ground truth naming one of
open-instruct's 25 functions (`open_instruct/if_functions.py` at e363290be) and its
arguments, e.g. `{"func_name": "validate_word_constraint", "N": 300, "quantifier":
"at least"}`; None-valued arguments are dropped, as the original did. Each function maps
one to one onto an IFEval instruction id (`TULU_TO_IFEVAL`), its arguments translated
below. Quantifiers: "at least" (>= N), "at most" (<= N), "around" (see tolerances).

Deviations from open-instruct (each a bug or a looser check there; ours uses the IFEval
checker's rule unless stated):
- validate_placeholders returned a (bool, list) tuple, always truthy, so it always paid
  the reward; here it is the real verdict (>= N `[...]` placeholders).
- validate_choice tested `response in option` (reversed) and iterated the characters
  when `options` was a string; here an option must appear in the response. A string of
  options is read as its quoted items ('...' or "..."), else as one option.
- verify_keyword_frequency: exactly N whole-word, case-insensitive occurrences (as the
  original), but words are delimited by non-word characters, not `\\b\\w+\\b` tokens.
- verify_letter_frequency: exactly N, but case-insensitive (IFEval); the original
  was case-sensitive.
- validate_forbidden_words: whole words (IFEval `\\b`); the original's substring test
  punished "rocky" for the forbidden "rock".
- verify_sentence_constraint: Punkt sentences (IFEval) instead of a `.`/`?` regex split
  that ignored `!`; "around" = within 1, as the original.
- validate_word_constraint: `\\w+` words (IFEval) instead of whitespace tokens; "around"
  = within max(1, round(0.1 N)), as the original.
- verify_paragraph_count: IFEval's rule with the Tulu prompt's `* * *` divider (the
  original also failed on a leading or trailing divider; IFEval drops those).
- validate_paragraphs: first word compared case-insensitively without trailing
  punctuation (IFEval); the original used a case-sensitive `startswith`.
- verify_postscript: the marker anywhere (IFEval); the original also demanded text after.
- verify_bullet_points: IFEval's bullets (`* x` or `- x`; `**bold**` lines not counted).
- validate_highlighted_sections: non-empty `*x*` / `**x**` spans (the original counted
  empty `**`).
- validate_sections: at least N `<splitter> <number>` headers (IFEval); the original
  split on the bare splitter and demanded exactly N pieces.
- validate_json_format: a ```json fence around the JSON is accepted (IFEval).
- validate_title: the title must be non-blank and on one line.
- validate_repeat_prompt, validate_end: case-insensitive, surrounding whitespace and
  (for the end) quotes ignored (IFEval).
- validate_frequency_capital_words: NLTK word tokens (IFEval); "around" = within
  max(1, round(0.1 N)) (the original's "around" was exact equality).
- validate_uppercase / validate_lowercase: also require English text (IFEval's
  english_capital / english_lowercase).
"""

from __future__ import annotations

import re

from tulu.verifiers import ifeval_checks as C

TULU_TO_IFEVAL = {
    "verify_keywords": "keywords:existence",
    "verify_keyword_frequency": "keywords:frequency",
    "validate_forbidden_words": "keywords:forbidden_words",
    "verify_letter_frequency": "keywords:letter_frequency",
    "validate_response_language": "language:response_language",
    "verify_sentence_constraint": "length_constraints:number_sentences",
    "verify_paragraph_count": "length_constraints:number_paragraphs",
    "validate_word_constraint": "length_constraints:number_words",
    "validate_paragraphs": "length_constraints:nth_paragraph_first_word",
    "validate_placeholders": "detectable_content:number_placeholders",
    "verify_postscript": "detectable_content:postscript",
    "verify_bullet_points": "detectable_format:number_bullet_lists",
    "validate_choice": "detectable_format:constrained_response",
    "validate_highlighted_sections": "detectable_format:number_highlighted_sections",
    "validate_sections": "detectable_format:multiple_sections",
    "validate_json_format": "detectable_format:json_format",
    "validate_title": "detectable_format:title",
    "validate_two_responses": "combination:two_responses",
    "validate_repeat_prompt": "combination:repeat_prompt",
    "validate_end": "startend:end_checker",
    "validate_quotation": "startend:quotation",
    "validate_frequency_capital_words": "change_case:capital_word_frequency",
    "validate_uppercase": "change_case:english_capital",
    "validate_lowercase": "change_case:english_lowercase",
    "validate_no_commas": "punctuation:no_comma",
}

_QUANTIFIERS = {"at least": "at least", "at most": "at most", "around": "around"}


def _quantifier(args: dict) -> str:
    q = str(args.get("quantifier", "at least")).strip().lower()
    if q not in _QUANTIFIERS:
        raise ValueError(f"unknown quantifier {q!r}; expected one of {sorted(_QUANTIFIERS)}")
    return _QUANTIFIERS[q]


def _options(options) -> tuple[str, ...]:
    if options is None:
        return C.CONSTRAINED_RESPONSE_OPTIONS
    if isinstance(options, str):
        quoted = re.findall(r"'([^']+)'|\"([^\"]+)\"", options)
        items = [a or b for a, b in quoted]
        return tuple(items) if items else (options,)
    return tuple(str(o) for o in options)


def _ten_percent(n) -> int:
    return max(1, round(0.1 * int(n)))


def check_tulu(response: str, constraint: dict) -> bool:
    """Verdict of one open-instruct constraint `{"func_name": ..., **args}`."""
    args = {k: v for k, v in constraint.items() if v is not None and k != "func_name"}
    name = constraint.get("func_name")
    if name not in TULU_TO_IFEVAL:
        raise ValueError(f"unknown func_name {name!r}; known: {sorted(TULU_TO_IFEVAL)}")
    a = args.get
    if name == "verify_keywords":
        return C.keywords_existence(response, a("keyword_list", []))
    if name == "verify_keyword_frequency":
        return C.keywords_frequency_words(response, a("word"), a("N"), "exactly")
    if name == "validate_forbidden_words":
        return C.forbidden_words(response, a("forbidden_words", []))
    if name == "verify_letter_frequency":
        return C.letter_frequency(response, a("letter"), a("N"), "exactly")
    if name == "validate_response_language":
        return C.response_language(response, a("language"))
    if name == "verify_sentence_constraint":
        return C.number_sentences(response, a("N"), _quantifier(args))
    if name == "verify_paragraph_count":
        return C.number_paragraphs(response, a("N"), divider="* * *")
    if name == "validate_word_constraint":
        return C.number_words(response, a("N"), _quantifier(args), _ten_percent(a("N")))
    if name == "validate_paragraphs":
        return C.nth_paragraph_first_word(response, a("N"), a("i"), a("first_word"))
    if name == "validate_placeholders":
        return C.number_placeholders(response, a("N"))
    if name == "verify_postscript":
        return C.postscript(response, a("postscript_marker"))
    if name == "verify_bullet_points":
        return C.number_bullet_lists(response, a("N"))
    if name == "validate_choice":
        return C.constrained_response(response, _options(a("options")))
    if name == "validate_highlighted_sections":
        return C.number_highlighted_sections(response, a("N"))
    if name == "validate_sections":
        return C.multiple_sections(response, a("section_splitter"), a("N"))
    if name == "validate_repeat_prompt":
        return C.repeat_prompt(response, a("original_prompt"))
    if name == "validate_end":
        return C.end_checker(response, a("end_phrase"))
    if name == "validate_frequency_capital_words":
        q = _quantifier(args)
        return C.capital_word_frequency(response, a("N"), q, _ten_percent(a("N")))
    return C.CHECKS[TULU_TO_IFEVAL[name]](response)  # the argument-free checks
