"""The tulu chat template, token by token, and assistant-only labels."""
import re

import pytest

from tulu.chat import IGNORE_INDEX, DataError, check_messages, encode, render, tokenize_sft
from tulu.model import load_tokenizer

EOS = "<|end_of_text|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tulu/tiny")


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "12 + 34 = 46. The answer is 46."},
    {"role": "user", "content": "And 5 - 2?"},
    {"role": "assistant", "content": "3"},
]


def test_rendered_text_matches_the_tulu_format(tok):
    # The tulu format, written out by hand (open-instruct dataset_processor.py:133 @e363290).
    expected = (f"<|system|>\nBe brief.\n<|user|>\nWhat is 12 + 34?\n<|assistant|>\n12 + 34 = 46. The answer is 46.{EOS}\n"
                f"<|user|>\nAnd 5 - 2?\n<|assistant|>\n3{EOS}")
    assert render(tok, CONV) == expected
    assert render(tok, CONV[:4], add_generation_prompt=True) == expected[: expected.rindex("<|assistant|>")] + "<|assistant|>\n"
    assert not render(tok, CONV).startswith(tok.bos_token)


def test_token_ids_equal_segmentwise_encoding_and_labels_cover_assistant_spans(tok):
    # Independent construction: encode each template segment separately and concatenate.
    segs = [("<|system|>\nBe brief.\n<|user|>\nWhat is 12 + 34?\n<|assistant|>\n", False),
            ("12 + 34 = 46. The answer is 46.", True), (EOS, True),
            ("\n<|user|>\nAnd 5 - 2?\n<|assistant|>\n", False), ("3", True), (EOS, True)]
    ids, labels = [], []
    for text, trained in segs:
        piece = encode(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    out = tokenize_sft(tok, CONV, max_seq_length=None)
    assert out["input_ids"] == ids
    assert out["labels"] == labels
    assert ids.count(tok.eos_token_id) == 2 and tok.bos_token_id not in ids


def test_truncation_keeps_the_prefix_and_drops_examples_without_trainable_tokens(tok):
    full = tokenize_sft(tok, CONV, None)
    prompt_len = len(encode(tok, render(tok, CONV[:2], add_generation_prompt=True)))
    cut = tokenize_sft(tok, CONV, prompt_len + 5)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 5] and cut["labels"] == full["labels"][: prompt_len + 5]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 5
    assert tokenize_sft(tok, CONV, prompt_len) is None  # only prompt tokens survive


@pytest.mark.parametrize("bad, field", [
    ([], "messages"), ("hi", "messages"), ([{"role": "user"}], "messages[0]"),
    ([{"content": "x"}], "messages[0]"), ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
])
def test_bad_messages_name_the_field(bad, field):
    with pytest.raises(DataError, match="ds row 7: field '" + re.escape(field)):
        check_messages(bad, "ds row 7")
