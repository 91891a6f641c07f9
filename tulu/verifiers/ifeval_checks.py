"""The 25 IFEval instruction checkers, one function each: `check(response, **kwargs) -> bool`.

Semantics follow Google's IFEval (Zhou et al. 2023, "Instruction-Following Evaluation
for Large Language Models", arXiv:2311.07911; google-research/instruction_following_eval
`instructions.py`, ported in lm-eval `lm_eval/tasks/ifeval`): same kwargs names, same
counting rules, same "less than" / "at least" relations. Written from those semantics,
not copied. Deliberate differences (none changes a verdict on the 541 real IFEval rows):

- keywords, forbidden words, the keyword of `keywords:frequency`, postscript markers
  and section splitters are matched as literal text (IFEval splices them into a regex
  unescaped, so "C++" would raise and "." would match any character).
- `keywords:letter_frequency` counts the letter it is given (lower-cased); IFEval swaps
  a non a-z letter such as "#" for a random one.
- Regexes that can backtrack quadratically on adversarial text (IFEval's bullet-list
  `^\\s*...` over long blank runs, `<<[^\\n]+>>` titles, `\\[.*?\\]` placeholders) are
  replaced by linear code that gives the same answers (differential test in
  tests/test_verifiers_ifeval.py).
- past `text.NLTK_MAX_CHARS` (100k characters) sentences and words come from the
  regex fallbacks, not NLTK (bounded time on megabyte responses).
- relations also accept "at most", "exactly" and "around" (used by the Tulu 3 constraint
  form, see `ifeval_tulu.py`); `around` takes a tolerance.
- an undetectable language (no letters) counts as followed, as in IFEval.
"""

from __future__ import annotations

import json
import re

from tulu.verifiers.text import detect_language, split_sentences, tokenize_words

RELATIONS = ("less than", "at least", "at most", "exactly", "around")
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_LINE_BLANK_RUN = re.compile(r"\s+")


def compare(count: int, relation: str, n: int, tolerance: int = 1) -> bool:
    """`count` against `n` under an IFEval relation (plus the Tulu 3 quantifiers)."""
    n = int(n)
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    if relation == "at most":
        return count <= n
    if relation == "exactly":
        return count == n
    if relation == "around":
        return abs(count - n) <= tolerance
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def keywords_existence(response: str, keywords) -> bool:
    low = response.lower()
    return all(str(k).lower() in low for k in keywords)


def keywords_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """Occurrences of `keyword`, case-insensitive, counted as substrings as in IFEval
    ("war" counts in "award")."""
    return compare(response.lower().count(keyword.strip().lower()), relation, frequency)


def keywords_frequency_words(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """Whole-word variant (the Tulu 3 form: "the word X should appear N times")."""
    pattern = r"(?<!\w)" + re.escape(keyword.strip()) + r"(?!\w)"
    return compare(len(re.findall(pattern, response, re.IGNORECASE)), relation, frequency)


def forbidden_words(response: str, forbidden_words) -> bool:
    for word in forbidden_words:
        if re.search(r"\b" + re.escape(str(word)) + r"\b", response, re.IGNORECASE):
            return False
    return True


def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    letter = letter.strip().lower()
    if len(letter) != 1:
        raise ValueError(f"letter_frequency needs one character, got {letter!r}")
    return compare(response.lower().count(letter), let_relation, let_frequency)


def response_language(response: str, language: str) -> bool:
    found = detect_language(response)
    return found is None or found == language


def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return compare(len(split_sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int, divider: str = "***") -> bool:
    """Paragraphs split by the markdown divider `***` (with one optional whitespace
    character either side); empty pieces count only at the two ends (dropped), an empty
    inner piece fails. `divider` lets the Tulu 3 form use its `* * *`."""
    pieces = re.split(r"\s?" + re.escape(divider) + r"\s?", response)
    count = len(pieces)
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i not in (0, len(pieces) - 1):
                return False
            count -= 1
    return count == int(num_paragraphs)


def number_words(response: str, num_words: int, relation: str, tolerance: int = 1) -> bool:
    """Words are `\\w+` runs (nltk RegexpTokenizer(r"\\w+") in IFEval)."""
    return compare(len(re.findall(r"\w+", response)), relation, num_words, tolerance)


def nth_paragraph_first_word(
    response: str, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """Paragraphs split on a blank line; the count ignores empty pieces, but the nth is
    indexed in the raw split (as IFEval). The first word is lower-cased, leading quotes
    dropped, cut at the first of . , ? ! ' \"."""
    pieces = response.split("\n\n")
    count = sum(1 for p in pieces if p.strip())
    nth = int(nth_paragraph)
    if nth > count or nth < 1:
        return False
    paragraph = pieces[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    cut = re.search(r"[.,?!'\"]", word)
    word = (word[: cut.start()] if cut else word).lower()
    return count == int(num_paragraphs) and word == first_word.strip().lower()


def number_placeholders(response: str, num_placeholders: int) -> bool:
    """`[...]` spans within a line, at least N. Same count as IFEval's lazy
    `\\[.*?\\]`, computed by a linear scan (the regex rescans a line from every `[`)."""
    count = 0
    for line in response.split("\n"):
        i = line.find("[")
        while i >= 0:
            j = line.find("]", i + 1)
            if j < 0:
                break
            count += 1
            i = line.find("[", j + 1)
    return count >= int(num_placeholders)


def postscript(response: str, postscript_marker: str) -> bool:
    """A line containing the marker (case-insensitive); "P.S." and "P.P.S" allow one
    optional space after each period, as IFEval."""
    low, marker = response.lower(), postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, low) is not None


def _collapse_blank_lines(text: str) -> str:
    """Shrink each whitespace run holding 2+ newlines to `head\\n\\ntail` (text before its
    first and after its last newline). Line-anchored `^\\s*X` matches are unchanged, but
    no longer rescan the run from every line start (quadratic on long blank runs)."""

    def shrink(m: re.Match) -> str:
        run = m.group()
        first, last = run.find("\n"), run.rfind("\n")
        return run if first == last else run[:first] + "\n\n" + run[last + 1 :]

    return _LINE_BLANK_RUN.sub(shrink, text)


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Markdown bullets: lines starting (after whitespace) with `* ` (a star not followed
    by another star) or `-`; the count must equal `num_bullets`."""
    text = _collapse_blank_lines(response)
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(num_bullets)


def constrained_response(response: str, options=CONSTRAINED_RESPONSE_OPTIONS) -> bool:
    text = response.strip()
    return any(option in text for option in options)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """`*text*` or `**text**` spans on one line with non-blank text; at least N."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    count += sum(
        1
        for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
        if h.removeprefix("**").removesuffix("**").strip()
    )
    return count >= int(num_highlights)


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least N section headers `<splitter> <number>` (IFEval's spelling `spliter`)."""
    pattern = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= int(num_sections)


def json_format(response: str) -> bool:
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return False
    return True


def title(response: str) -> bool:
    """A `<<title>>` on one line with non-blank text. IFEval's greedy `<<[^\\n]+>>` takes,
    per line, the first `<<` to the last `>>`; computed directly here (linear)."""
    for line in response.split("\n"):
        i, j = line.find("<<"), line.rfind(">>")
        if i >= 0 and j >= i + 3 and line[i : j + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def two_responses(response: str) -> bool:
    parts = response.split("******")
    kept = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            kept.append(part)
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def capital_word_frequency(
    response: str, capital_frequency: int, capital_relation: str, tolerance: int = 1
) -> bool:
    capitals = sum(1 for w in tokenize_words(response) if w.isupper())
    return compare(capitals, capital_relation, capital_frequency, tolerance)


def english_capital(response: str) -> bool:
    return response.isupper() and detect_language(response) in ("en", None)


def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in ("en", None)


def no_comma(response: str) -> bool:
    return "," not in response


CHECKS = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}
