"""Tiny random models of the families people post-train, built from transformers' own config classes
and saved with the embedded tokenizer (tulu/tiny.py), so every script loads them like a hub folder.

    write_family("qwen3_moe", tmp_path / "qwen3_moe")   # -> a model folder

Each keeps the family's distinguishing mechanics at toy size: Qwen3's q/k norms, OLMo 2's norm
placement, Mistral's sliding-window config, Phi-3's fused qkv/gate-up projections, Gemma 2's soft-capped
attention and logits, tied embeddings and embedding scaling, Qwen3-MoE's and OLMoE's routed experts
(fused in memory, per expert in the files), and a tied-embedding Qwen2.
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen3", "olmo2", "mistral", "phi3", "gemma2", "qwen3_moe", "olmoe", "qwen2_tied")


def family_config(name: str, vocab_size: int):
    import transformers as T

    # head_dim 32 everywhere: vLLM's CPU attention has no kernel for 16
    base = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    moe = dict(num_experts=4, num_experts_per_tok=2)
    configs = {
        "llama": lambda: T.LlamaConfig(**base),
        "qwen3": lambda: T.Qwen3Config(**base, head_dim=32),
        "olmo2": lambda: T.Olmo2Config(**base),
        "mistral": lambda: T.MistralConfig(**base, sliding_window=64),
        "phi3": lambda: T.Phi3Config(**base),
        "gemma2": lambda: T.Gemma2Config(**base, head_dim=32, sliding_window=64),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**base, head_dim=32, moe_intermediate_size=32, **moe),
        "olmoe": lambda: T.OlmoeConfig(**{**base, "intermediate_size": 32}, **moe),
        "qwen2_tied": lambda: T.Qwen2Config(**base, tie_word_embeddings=True),
    }
    return configs[name]()


def write_family(name: str, dst: Path, seed: int = 0) -> Path:
    """A randomly initialized tiny model of family `name` in `dst`, with the embedded tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tulu.tiny import tiny_dir

    tok = AutoTokenizer.from_pretrained(tiny_dir())
    config = family_config(name, (len(tok) + 7) // 8 * 8)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return Path(dst)
