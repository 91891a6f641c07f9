"""The embedded default: a tiny Llama-shaped model and a byte-level BPE tokenizer, built locally.

`tiny_dir()` returns a Hugging Face model folder (config, safetensors weights, tokenizer with the
tulu chat template) that every script loads exactly like a hub model. Built once from a fixed seed
and cached under $TULU_CACHE (default ~/.cache/tulu); nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_NAME = "tulu/tiny"
_VERSION = "v5"  # bump when the recipe below changes, so stale caches are not reused
SPECIAL_TOKENS = ["<|end_of_text|>", "<pad>", "<|begin_of_text|>"]
VOCAB_SIZE = 512  # BPE target; the model's embedding rows = vocab rounded up to a multiple of 8


def cache_root() -> Path:
    return Path(os.environ.get("TULU_CACHE", Path.home() / ".cache" / "tulu"))


def build_tokenizer():
    """Byte-level BPE with single-digit tokens (arithmetic stays learnable), learned on synthetic text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tulu.chat import TULU_TEMPLATE
    from tulu.synth import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>", pad_token="<pad>",
                                   bos_token="<|begin_of_text|>")
    fast.chat_template = TULU_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides):
    """Llama-shaped, ~1M parameters: hidden 128, 4 layers, 4 heads (2 kv), untied embeddings."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=(vocab_size + 7) // 8 * 8, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
              tie_word_embeddings=False, use_cache=False, bos_token_id=2, eos_token_id=0, pad_token_id=1)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _build(dst: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = tiny_config(len(tokenizer), eos_token_id=ids[0], pad_token_id=ids[1], bos_token_id=ids[2])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Written by hand: transformers' save_pretrained silently skips the weights on any rank but 0
    # of an initialized process group, and every torchrun rank may be the one that builds this.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(dst)
    GenerationConfig(eos_token_id=ids[0], pad_token_id=ids[1], bos_token_id=ids[2]).save_pretrained(dst)
    tokenizer.save_pretrained(dst)


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _complete(folder: Path) -> bool:
    return all((folder / f).exists() for f in REQUIRED_FILES)


def tiny_dir() -> Path:
    """Path of the tiny model folder, building it on first use. Safe under concurrent ranks: each
    builder writes a private temp folder and publishes it with one atomic rename; a damaged cached
    folder (missing files) is set aside and rebuilt."""
    dst = cache_root() / f"tiny-{_VERSION}"
    if _complete(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not _complete(dst):  # damaged (a complete one only appears by rename)
        shutil.rmtree(dst, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dst.parent))
    try:
        _build(tmp)
        if not _complete(tmp):  # never publish a partial folder (seen with another transformers version)
            raise RuntimeError(f"tiny model build wrote only {sorted(os.listdir(tmp))}")
        try:
            os.rename(tmp, dst)
        except OSError:  # another process published first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _complete(dst):
        raise RuntimeError(f"building the tiny model in {dst} failed (missing files); remove the folder and retry")
    return dst
