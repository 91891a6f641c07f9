"""Chat templates and tokenization with assistant-only labels.

The "tulu" template is the one the released Tulu 3 models use (open-instruct
`dataset_processor.CHAT_TEMPLATES["tulu"]` @e363290, dataset_processor.py:133): no BOS, the eos token
closes every assistant turn, a newline follows it unless it is the last message.
"""
from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATES = {"tulu": TULU_TEMPLATE}


class DataError(ValueError):
    """A bad input row: the message names the dataset, the row and the field."""


def setup_tokenizer(tokenizer, chat_template_name: str = "tulu"):
    """Tulu 3 tokenizer fix-ups (finetune.py:666-689 @e363290): add `<pad>` when there is no pad token and
    install the chat template (a CHAT_TEMPLATES key; any other value keeps the tokenizer's own)."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if chat_template_name in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[chat_template_name]
    elif not tokenizer.chat_template:
        raise ValueError(f"unknown chat template {chat_template_name!r} and the tokenizer has none; "
                         f"choose one of {sorted(CHAT_TEMPLATES)}")
    return tokenizer


def check_messages(messages: Any, where: str, field: str = "messages") -> None:
    """Raise DataError unless `messages` is a non-empty list of {role, content} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages, got {messages!r:.80}")
    for i, m in enumerate(messages):
        # Arrow fills a key that other rows have with None, so None counts as missing.
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise DataError(f"{where}: field '{field}[{i}]' needs 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}[{i}].role' is {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: field '{field}[{i}].content' must be a string, got {type(m['content']).__name__}")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text. No special tokens added: the template has no BOS
    (dataset_processor.py:133 @e363290)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_sft(tokenizer, messages: list[dict], max_seq_length: int | None) -> dict | None:
    """input_ids and labels for one conversation; only assistant content and its eos are trained.

    Mask by prefix lengths exactly as open-instruct `encode_sft_example` (finetune.py:382 @e363290): each
    non-assistant message's span, plus the `<|assistant|>\\n` that follows it, is IGNORE_INDEX.
    Right truncation at max_seq_length. Returns None when no trainable token is left.
    """
    input_ids = encode(tokenizer, render(tokenizer, messages))
    if max_seq_length is not None:
        input_ids = input_ids[:max_seq_length]
    labels = list(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(encode(tokenizer, render(tokenizer, messages[:i])))
        next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = len(encode(tokenizer, render(tokenizer, messages[: i + 1], add_generation_prompt=next_is_assistant)))
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if max_seq_length is not None and end >= max_seq_length:
            break
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}
