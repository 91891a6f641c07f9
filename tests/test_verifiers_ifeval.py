"""IFEval checkers: every instruction id, the Tulu 3 constraint form, loose mode,
linear rewrites of IFEval's regexes, the fallback text primitives, adversarial input."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from tulu.verifiers import verify
from tulu.verifiers.ifeval import instruction_results, loose_variants
from tulu.verifiers.ifeval_checks import CHECKS, number_bullet_lists, number_placeholders, title
from tulu.verifiers.ifeval_tulu import TULU_TO_IFEVAL
from tulu.verifiers.text import split_sentences_simple, tokenize_words_simple

EN = "The garden was quiet in the early morning. Birds sang in the tall trees near the river."
DE = "Der Garten war am frühen Morgen ganz ruhig. Die Vögel sangen in den hohen Bäumen am Fluss."

# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["garden", "river"]}, EN, "The park was quiet."),
    ("keywords:frequency", {"keyword": "tree", "frequency": 2, "relation": "at least"}, "tree, trees", "one tree"),
    ("keywords:frequency", {"keyword": "tree", "frequency": 2, "relation": "less than"}, "one tree", "tree tree"),
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]}, "a rocky road", "a Rock band"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag", "zag"),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "a cat", "A banana"),
    ("language:response_language", {"language": "de"}, DE, EN),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One. ", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "Hi. Dr. Who came. Bye!", "Hi. Bye."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One\n***\nTwo", "One\n***\n\n***\nTwo"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "state-of-the-art model", "two words"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "two words", "one two three"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\n\"Then, second.", "First part.\n\nNext second."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [address]", "Dear [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body.\n\np. s. see you", "Body only."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Body.\nP.P.S more", "Body.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\n**bold**", "* one\n* two\n- three"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nx\nSECTION 2\ny", "SECTION 1\nx\nSECTION two"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<My Title>>\nbody", "<< >>\nbody"),
    ("combination:two_responses", {}, "Yes it is.\n******\nNo it is not.", "Same\n******\nSame"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem"}, "write a POEM\nRoses...", "Roses... Write a poem"),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, 'Done. any questions?"', "Any questions? Done."),
    ("startend:quotation", {}, ' "Quoted text" ', '"Unclosed'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and the ESA", "Only NASA here"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only NASA here", "NASA, ESA and JAXA"),
    ("change_case:english_capital", {}, EN.upper(), EN),
    ("change_case:english_lowercase", {}, EN.lower(), EN),
    ("change_case:english_lowercase", {}, EN.lower(), DE.lower()),
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
]


def _gt(iid, kwargs):
    return {"instruction_id_list": [iid], "kwargs": [kwargs]}


def test_every_instruction_id_is_covered():
    assert {c[0] for c in CASES} == set(CHECKS) and len(CHECKS) == 25


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_positive_and_negative(iid, kwargs, good, bad):
    assert verify("ifeval", good, _gt(iid, kwargs)) == 1.0
    assert verify("ifeval", bad, json.dumps(_gt(iid, kwargs))) == 0.0


def test_prompt_level_score_needs_every_instruction():
    gt = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    assert instruction_results('"a, b"', gt) == [False, True]
    assert verify("ifeval", '"a, b"', gt) == 0.0 and verify("ifeval", '"a b"', gt) == 1.0


def test_blank_response_follows_nothing():
    assert verify("ifeval", "   ", _gt("punctuation:no_comma", {})) == 0.0


def test_loose_mode_drops_first_last_lines_and_stars():
    assert len(loose_variants("a\nb\nc")) == 8
    gt = _gt("startend:end_checker", {"end_phrase": "Bye."})
    response = "Hello there.\nBye.\n*Let me know if you need more.*"
    assert verify("ifeval", response, gt) == 0.0
    assert verify("ifeval_loose", response, gt) == 1.0
    assert verify("ifeval", response, {**gt, "mode": "loose"}) == 1.0
    stars = _gt("startend:quotation", {})
    assert verify("ifeval_loose", '*"hi"*', stars) == 1.0 and verify("ifeval", '*"hi"*', stars) == 0.0


# Tulu 3 (open-instruct) constraint form: (ground truth, follows, violates)
TULU = [
    ({"func_name": "verify_keywords", "keyword_list": ["Garden"]}, EN, "nothing"),
    ({"func_name": "verify_keyword_frequency", "word": "war", "N": 2}, "War and war.", "war, warm, award"),
    ({"func_name": "validate_forbidden_words", "forbidden_words": ["rock"]}, "rocky", "rock"),
    ({"func_name": "verify_letter_frequency", "letter": "b", "N": 2}, "Bob", "bob b"),
    ({"func_name": "validate_response_language", "language": "de"}, DE, EN),
    ({"func_name": "verify_sentence_constraint", "N": 3, "quantifier": "around"}, "Go. Run now! Why? Stop here.", "Go."),
    ({"func_name": "verify_sentence_constraint", "N": 2, "quantifier": "at most"}, "Go now. Stop here.", "Go now. Stop here. Run fast."),
    ({"func_name": "verify_paragraph_count", "N": 2}, "One\n* * *\nTwo", "One\n***\nTwo"),
    ({"func_name": "validate_word_constraint", "N": 20, "quantifier": "around"}, "w " * 22, "w " * 23),
    ({"func_name": "validate_paragraphs", "N": 2, "i": 2, "first_word": "Then"}, "A\n\nthen b", "A\n\nB then"),
    ({"func_name": "validate_placeholders", "N": 1}, "[x]", "none"),
    ({"func_name": "verify_postscript", "postscript_marker": "P.S."}, "a\nP.S. b", "a"),
    ({"func_name": "verify_bullet_points", "N": 1}, "* a", "**a**\n* b\n* c"),
    ({"func_name": "validate_choice", "options": "('My answer is yes.', 'My answer is no.')"}, "My answer is no.", "no"),
    ({"func_name": "validate_highlighted_sections", "N": 1}, "*a*", "**"),
    ({"func_name": "validate_sections", "N": 2, "section_splitter": "Section"}, "Section 1 a Section 2 b", "Section 1 a"),
    ({"func_name": "validate_json_format"}, "[1, 2]", "[1, 2"),
    ({"func_name": "validate_title"}, "<<T>>", "<<>>"),
    ({"func_name": "validate_two_responses"}, "a\n******\nb", "a"),
    ({"func_name": "validate_repeat_prompt", "original_prompt": "Say hi."}, "say hi. hi", "hi"),
    ({"func_name": "validate_end", "end_phrase": "The end."}, "x The end.", "The end. x"),
    ({"func_name": "validate_quotation"}, '"x"', "x"),
    ({"func_name": "validate_frequency_capital_words", "N": 2, "quantifier": "at most"}, "NASA", "A B C"),
    ({"func_name": "validate_uppercase"}, EN.upper(), EN),
    ({"func_name": "validate_lowercase"}, EN.lower(), EN),
    ({"func_name": "validate_no_commas", "extra": None}, "a b", "a, b"),
]


def test_every_tulu_function_is_mapped_and_covered():
    assert {t[0]["func_name"] for t in TULU} == set(TULU_TO_IFEVAL) and len(TULU_TO_IFEVAL) == 25
    assert set(TULU_TO_IFEVAL.values()) == set(CHECKS)


@pytest.mark.parametrize("gt,good,bad", TULU, ids=[t[0]["func_name"] + str(i) for i, t in enumerate(TULU)])
def test_tulu_constraint_form(gt, good, bad):
    assert verify("ifeval", good, json.dumps(gt)) == 1.0
    assert verify("ifeval", bad, gt) == 0.0


def _raw_bullets(text):  # IFEval's regexes, for the differential test
    return len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.M)) + len(re.findall(r"^\s*-.*$", text, flags=re.M))


def test_linear_rewrites_match_ifevals_regexes_on_random_text():
    rng = random.Random(0)
    alphabet = ["*", "-", "\n", " ", "\t", "a", "<", ">", "[", "]", "\n\n", "**"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert number_bullet_lists(text, _raw_bullets(text)), repr(text)
        raw_titles = any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))
        assert title(text) == raw_titles, repr(text)
        n = len(re.findall(r"\[.*?\]", text))
        assert number_placeholders(text, n) and not number_placeholders(text, n + 1), repr(text)


def test_adversarial_responses_are_bounded():
    gts = [_gt(iid, kw) for iid, kw, _, _ in CASES]
    big = ["\n" * 300_000 + "* x", " \n" * 200_000, "[" * 500_000, "<<" * 200_000, "{" * 200_000, "*" * 200_000,
           ("P.S. " * 100_000), "\U0001f600" * 100_000]
    start = time.perf_counter()
    for response in big:
        for gt in gts:  # NLTK steps aside past text.NLTK_MAX_CHARS (linear fallbacks)
            assert verify("ifeval", response, gt) in (0.0, 1.0)
    assert time.perf_counter() - start < 20


def test_fallback_sentence_splitter():
    assert split_sentences_simple("Hello world. How are you? Fine!") == ["Hello world.", "How are you?", "Fine!"]
    assert len(split_sentences_simple("Mr. Smith met Dr. Who at 5 p.m. today. Then left.")) == 2
    assert len(split_sentences_simple("J. R. R. Tolkien wrote it. Yes.")) == 2
    assert split_sentences_simple('He said "stop." She did.') == ['He said "stop."', "She did."]
    assert split_sentences_simple("  ") == [] and split_sentences_simple("no end") == ["no end"]
    assert len(split_sentences_simple("Version 3.14 is out. Get it.")) == 2


def test_fallback_word_tokenizer():
    assert tokenize_words_simple("NASA's STATE-OF-THE-ART rover, OK?") == ["NASA's", "STATE-OF-THE-ART", "rover", ",", "OK", "?"]
