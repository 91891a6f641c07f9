"""Text primitives the IFEval checkers need: sentences, words, language.

Sentence and word tokenization follow Google's IFEval (Zhou et al. 2023,
arXiv:2311.07911; google-research/instruction_following_eval
`instructions_util.py`): NLTK's Punkt sentence splitter for
`length_constraints:number_sentences` and NLTK's `word_tokenize` for
`change_case:capital_word_frequency`. Punkt needs its `punkt_tab` tables; they are
looked up on NLTK's usual search path (`NLTK_DATA`, ~/nltk_data, ...) and, when the
project sits next to the shared data folder, in `../shared/data/nltk_data`. Nothing
is ever downloaded at run time: without the tables we fall back to
`split_sentences_simple` / `tokenize_words_simple` below, which approximate Punkt and
the Treebank tokenizer (documented where they differ).

Language detection uses `langdetect` (a port of Google's language-detection
library, the detector IFEval itself uses), seeded so a verdict never depends on the
run; each `detect` call builds its own seeded RNG, so it is thread-safe once the
language profiles are loaded (which we do once, under a lock).
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path

# NLTK's Punkt + Treebank run ~10 s per megabyte here; past this size (100x a long RL
# response) the linear regex fallbacks below are used instead, keeping every check fast.
NLTK_MAX_CHARS = 100_000
_SHARED_NLTK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nltk_data"
_load_lock = threading.Lock()

# Abbreviations that end in a period without ending the sentence (fallback splitter).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e u.s u.k a.m p.m no fig inc ltd co corp "
    "jan feb mar apr jun jul aug sep sept oct nov dec approx dept est mt".split()
)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


@functools.lru_cache(maxsize=1)
def _punkt():
    """The English Punkt tokenizer, or None when its tables are not installed."""
    try:
        import nltk

        if _SHARED_NLTK.is_dir() and str(_SHARED_NLTK) not in nltk.data.path:
            nltk.data.path.append(str(_SHARED_NLTK))
        nltk.data.find("tokenizers/punkt_tab/english/")
        from nltk.tokenize import PunktTokenizer

        return PunktTokenizer("english")
    except (LookupError, ImportError, OSError):
        return None


def has_punkt() -> bool:
    """True when NLTK's Punkt tables were found (IFEval-exact sentence counts)."""
    with _load_lock:
        return _punkt() is not None


def split_sentences_simple(text: str) -> list[str]:
    """Fallback sentence splitter: break after `.`, `!` or `?` (plus closing quotes or
    brackets) followed by whitespace, unless the word before the period is a known
    abbreviation or a single letter (initials such as "J. R. R."). Approximates Punkt;
    differs on rare abbreviations and on sentences that begin in lower case."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.group().startswith(".") and len(m.group()) == 1:
            prev = text[start : m.start()].rsplit(None, 1)
            word = prev[-1].lower().lstrip("(\"'") if prev else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        piece = text[start : m.end()].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def tokenize_words_simple(text: str) -> list[str]:
    """Fallback word tokenizer: words (hyphen/apostrophe compounds kept whole) and single
    punctuation marks. Treebank instead splits clitics ("DON'T" -> "DO", "N'T"), which
    can change a capital-word count by the number of such contractions."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """Sentences as IFEval counts them (Punkt), or the fallback splitter."""
    tok = _punkt() if len(text) <= NLTK_MAX_CHARS and has_punkt() else None
    return tok.tokenize(text) if tok is not None else split_sentences_simple(text)


def tokenize_words(text: str) -> list[str]:
    """Words as IFEval's capital-word count sees them (`nltk.word_tokenize`)."""
    if len(text) <= NLTK_MAX_CHARS and has_punkt():
        import nltk

        return nltk.word_tokenize(text)
    return tokenize_words_simple(text)


@functools.lru_cache(maxsize=1)
def _langdetect():
    import langdetect
    from langdetect import DetectorFactory, detector_factory

    DetectorFactory.seed = 0  # deterministic verdicts (IFEval leaves it unseeded)
    detector_factory.init_factory()  # load the profiles once, before any thread races
    return langdetect


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of `text` (langdetect, seed 0); None when undetectable (no
    letters at all). langdetect reads at most its first 10,000 normalized characters,
    so the cost is bounded for any response size."""
    with _load_lock:
        ld = _langdetect()
    try:
        return ld.detect(text)
    except ld.LangDetectException:
        return None
