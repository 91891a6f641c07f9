"""Small tensor ops shared by the losses: log-probs, masked reductions, whitening, entropy.

All functions are pure (no model, no collectives). Shapes: B = batch rows, T = tokens, V = vocab.
"""
from __future__ import annotations

import torch

# Rows of logits upcast to fp32 at a time in `logprobs_from_logits`: bounds the fp32 copy of a
# (B, T, V) bf16 tensor to (chunk, T, V) instead of the whole thing.
_LOGPROB_ROW_CHUNK = 4


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], computed in fp32 a few rows at a time.

    logits: (B, T, V) any float dtype; labels: (B, T) int64 (negative labels give 0, mask them yourself).
    Returns (B, T) fp32. Never materializes a full fp32 (B, T, V) log-softmax.
    """
    safe = labels.clamp(min=0)  # (B, T)
    out = []
    for lo in range(0, logits.shape[0], _LOGPROB_ROW_CHUNK):
        x = logits[lo : lo + _LOGPROB_ROW_CHUNK].float()  # (b, T, V)
        if temperature != 1.0:
            x = x / temperature
        picked = torch.gather(x, -1, safe[lo : lo + _LOGPROB_ROW_CHUNK, :, None]).squeeze(-1)  # (b, T)
        out.append(picked - torch.logsumexp(x, dim=-1))
    return torch.cat(out, dim=0)  # (B, T)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true (mask may be bool or 0/1)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is true; an all-false mask gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked positions (Bessel-corrected by default, as the original's masked_var)."""
    mean = masked_mean(x, mask)
    sq = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().clamp(min=2)
        sq = sq * n / (n - 1)
    return sq


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked positions; shift_mean=False adds the mean back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T) fp32."""
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(-1)


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-segment sums of a packed row: out[s] = Σ_{t: segment_ids[t] == s} values[t].

    values: (T,) or (1, T); segment_ids: (T,) int64 in [0, num_segments), or negative for tokens that
    belong to no segment (separators, padding): those are dropped. Returns (num_segments,) in values'
    dtype, differentiable w.r.t. values (index_add). A packed forward uses this to turn its (1, T)
    token log-probs into per-sequence log-probs without unpacking.
    """
    flat = values.reshape(-1)  # (T,)
    ids = segment_ids.reshape(-1).long()  # (T,)
    ids = torch.where(ids < 0, num_segments, ids)  # (T,) negative ids go to a spill bucket, sliced off
    out = flat.new_zeros(num_segments + 1).index_add(0, ids, flat)  # (S+1,)
    return out[:num_segments]  # (S,)


def sequence_logps(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    average: bool,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> torch.Tensor:
    """Per-sequence log-probability: Σ_t mask·logp_t, or that sum / Σ_t mask when `average`.

    Padded batch: token_logps, mask (B, T) -> (B,). Packed row: token_logps, mask (1, T) or (T,) with
    segment_ids (T,) and num_segments S -> (S,). A sequence with no unmasked token gives 0 (the
    original `_get_batch_logps` divided by 0 and gave NaN; open-instruct 94a17b99a clamps to 1 too).
    """
    masked = torch.where(mask.bool(), token_logps, 0.0)  # (B, T) where, not *, so a -inf pad can't NaN
    count = mask.to(token_logps.dtype)  # (B, T)
    if segment_ids is None:
        total, n = masked.sum(-1), count.sum(-1)  # (B,), (B,)
    else:
        assert num_segments is not None, "packed rows need num_segments"
        total = segment_sums(masked, segment_ids, num_segments)  # (S,)
        n = segment_sums(count, segment_ids, num_segments)  # (S,)
    return total / n.clamp(min=1) if average else total
