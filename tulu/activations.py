"""Memory beyond model state, from the model config: what autograd saves in a training micro-batch,
the LM head's logits, the backward's transients, and a vLLM engine's KV cache. `--dry_run` adds these
to tulu/memory.py's model state to print a per-rank peak (tulu/plan.py).

Saved for backward per token of a Llama-style decoder layer (HF's modeling code; b = bytes of the
compute dtype; h hidden, i intermediate, q = heads·head_dim, kv = kv_heads·head_dim):
- each RMSNorm and the projection after it: 4h + 2bh. The norm upcasts its input to fp32 (4h, kept for
  the square and the scale), keeps the scaled result in the compute dtype (bh; fp32 at b = 4, where it
  is a second fp32 tensor) and the projection keeps the weighted output (bh). Two per layer.
- attention: q and k, v after RoPE as the kernel gets them, b(q + 2kv) (k and v repeated to q's size
  when a mask forces `repeat_kv`: packed or padded rows), the output twice (the kernel keeps it, and
  o_proj its transposed copy), 2bq, and the log-sum-exp, 4·heads. A fused kernel (flash, CPU flash,
  memory-efficient) keeps no (T, T) scores; a math-kernel fallback would.
- the MLP: gate and up outputs, silu(gate) and the product that enters down_proj, 4bi.
With activation checkpointing (tulu/fsdp.py checkpoints each block) only each block's input stays,
bh per token, and backward recomputes one block at a time.

The LM head: the full path keeps the (T, V) logits and an fp32 copy for the log-softmax (one
tensor at b = 4) and its backward holds the fp32 softmax and gradient; the chunked path
(tulu/lm_head.py) holds one (chunk, V) block of those at a time and keeps nothing.

Checked against torch's MemTracker (every live tensor's bytes, on CPU) by benchmarks/plan_check.py:
benchmarks/RESULTS.md has the table. Not counted: allocator slack and fragmentation, NCCL buffers,
CUDA context (~0.5-1 GiB on a GPU), a math-kernel attention fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

from tulu.lm_head import DEFAULT_CHUNK


@dataclass(frozen=True)
class Shape:
    """What the formulas read from an HF config (decoder-only)."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, heads,
                   getattr(c, "num_key_value_heads", None) or heads, head_dim, c.vocab_size)


def _norm_and_proj(s: Shape, b: int) -> int:
    return 4 * s.hidden + 2 * b * s.hidden


def layer_bytes_per_token(s: Shape, b: int, repeat_kv: bool = False) -> int:
    """Bytes one decoder layer saves for backward, per token."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attn = b * (q + 2 * (q if repeat_kv else kv)) + 2 * b * q + 4 * s.heads
    return 2 * _norm_and_proj(s, b) + attn + 4 * b * s.intermediate


def head_bytes(s: Shape, tokens: int, b: int, chunked: bool, chunk: int = DEFAULT_CHUNK) -> tuple[int, int]:
    """(saved, transient) bytes of the LM head and its log-softmax for `tokens` positions."""
    if chunked:
        rows = min(chunk, tokens)
        return 0, rows * s.vocab * (b + 8) + 4 * tokens * s.hidden  # a chunk's logits, fp32 softmax + grad
    upcast = 4 if b != 4 else 0  # logits.float() is the same tensor at b = 4
    return tokens * s.vocab * (b + upcast), tokens * s.vocab * (8 + (b if b != 4 else 0))


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank holds for a micro-batch's forward + backward, beyond the model state."""
    saved: int            # activations kept for backward: every block's, or only their inputs under AC
    layer: int            # one block's activations (rebuilt in backward under AC, freed block by block without)
    head_saved: int       # logits (and their fp32 copy) kept for backward; 0 when chunked
    head_transient: int   # the head's backward: softmax and gradient of the logits (or of one chunk)
    block_transient: int  # one block's backward: the gradients of its largest activations

    def peak(self, grad_bytes: int, checkpointing: bool) -> int:
        """The largest of three moments of backward: the head (every activation still kept, no
        gradients yet), the first block (its gradients beside everything kept; under AC one block
        rebuilt on top), the last block (every gradient shard exists, only that block's activations are left)."""
        rebuilt = self.layer if checkpointing else 0
        head = self.saved + self.head_saved + self.head_transient
        first = self.saved + rebuilt + self.block_transient
        last = grad_bytes + self.layer + self.block_transient
        return max(head, first, last)


def step_memory(config, tokens: int, b: int, checkpointing: bool, chunked: bool, repeat_kv: bool = False,
                has_lm_head: bool = True) -> StepMemory:
    """A micro-batch of `tokens` tokens (rows x length) through a trained decoder.
    has_lm_head=False: a reward or value model (a (T, 1) score head, nothing of size V)."""
    s = Shape.of(config)
    layer = layer_bytes_per_token(s, b, repeat_kv) * tokens
    final_norm = _norm_and_proj(s, b) * tokens
    saved = (s.layers * b * s.hidden * tokens if checkpointing else s.layers * layer) + final_norm
    head_saved, head_transient = head_bytes(s, tokens, b, chunked) if has_lm_head else (0, 0)
    block_transient = 3 * b * s.intermediate * tokens  # the MLP's input gradients while one block runs backward
    return StepMemory(saved, layer, head_saved, head_transient, block_transient)


def frozen_forward_bytes(config, tokens: int, b: int, chunked: bool, has_lm_head: bool = True) -> int:
    """A no-grad forward (reference or reward model, scoring): one block's live tensors and the head's."""
    s = Shape.of(config)
    block = tokens * (2 * b * s.hidden + b * (s.heads + 2 * s.kv_heads) * s.head_dim + 3 * b * s.intermediate)
    if not has_lm_head:
        return block
    rows = min(DEFAULT_CHUNK, tokens) if chunked else tokens
    return max(block, rows * s.vocab * (b + 4))


def kv_cache_bytes(config, sequences: int, length: int, b: int = 2) -> int:
    """vLLM's KV cache for `sequences` sequences of `length` tokens in flight at once (bf16: b = 2)."""
    s = Shape.of(config)
    return 2 * s.layers * s.kv_heads * s.head_dim * b * sequences * length
