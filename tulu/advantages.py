"""Advantages: GAE and returns for PPO, whitening, and group-normalized advantages for GRPO.

Pure functions of tensors. Shapes: B = sequences, T = response tokens.
Sources: open-instruct ppo_vllm_thread_ray_gtrl.py:1193-1204 @e363290 (GAE, whitening) and
grpo_vllm_thread_ray_gtrl.py 648539372.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from tulu.ops import masked_whiten


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), backwards over t = T−1..0.

    δ_t = r_t + γ·V_{t+1} − V_t (V_T = 0);  A_t = δ_t + γλ·A_{t+1};  returns = A + V.
    rewards, values: (B, T); mask: (B, T), True on the valid region (PPO: tokens 0..seq_len+1, the
    score position included). Rewards and values outside it are taken as 0, as the original zeroes
    them, so A = 0 past the valid region. Returns (advantages, returns), both (B, T), no gradient.
    """
    with torch.no_grad():
        rewards = torch.where(mask.bool(), rewards, 0.0)  # (B, T)
        values = torch.where(mask.bool(), values, 0.0)  # (B, T)
        T = rewards.shape[1]
        advantages = torch.zeros_like(rewards)  # (B, T)
        last = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
        next_value = torch.zeros_like(last)  # (B,) V_{t+1}
        for t in reversed(range(T)):  # T sequential steps of (B,) work: cheap next to any forward
            delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
            last = delta + gamma * lam * last  # (B,)
            advantages[:, t] = last
            next_value = values[:, t]
        return advantages, advantages + values


def whiten_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(A − mean)·rsqrt(var + eps) over the masked tokens, unbiased var, then 0 on padding.

    advantages, mask: (B, T) -> (B, T). mask is the policy mask (tokens 0..seq_len). The original
    whitens over the RANK-LOCAL rollout batch (no all-reduce); whiten_global whitens over all ranks.
    """
    whitened = masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)  # (B, T)
    return torch.where(mask.bool(), whitened, 0.0)


def whiten_global(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x − mean)·rsqrt(var + eps) over the masked positions of EVERY rank's x; 0 on padding.

    Two passes, as the original's masked_var (ppo_vllm_thread_ray_gtrl.py:460): mean = Σx / n from all-reduced
    [Σx, n], then var = Σ(x − mean)² / (n − 1) from a second all-reduce (unbiased, + eps). The
    one-pass E[x²] − mean² cancels catastrophically when |mean| >> std (it can even go negative,
    NaN from rsqrt); the sums run in float64 for the same reason. all_reduce: an in-place sum over
    the ranks (tulu.dist.all_reduce); None = this rank's batch only. x, mask: (B, T) -> (B, T) in
    x's dtype. The original whitened each rank's slice instead (README: deviations).
    """
    reduce = all_reduce or (lambda t: t)
    m = mask.bool()
    x64 = torch.where(m, x.to(torch.float64), 0.0)  # (B, T)
    total, n = reduce(torch.stack([x64.sum(), m.sum().to(torch.float64)])).unbind()  # collective 1
    mean = total / n.clamp(min=1)
    sq = reduce(torch.where(m, (x64 - mean) ** 2, 0.0).sum().reshape(1))[0]  # collective 2
    var = sq / (n - 1).clamp(min=1)
    return torch.where(m, (x64 - mean) * torch.rsqrt(var + eps), 0.0).to(x.dtype)  # (B, T)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-8, unbiased: bool = True, scale_by_std: bool = True
) -> torch.Tensor:
    """Group-normalized advantages (Shao et al. 2024, DeepSeekMath §4.1.2): (s − mean_g)/(std_g + eps).

    scores: (B·n,) with the n samples of each prompt contiguous (vLLM n / repeat_interleave order)
    -> (B·n,). std: unbiased (torch.std's default, what open-instruct used) or biased (unbiased=False).
    scale_by_std=False gives s − mean_g (Dr. GRPO, Liu et al. 2025: no std division).
    A group whose scores are all equal gets EXACTLY 0: (s − mean) in floating point can be a tiny
    nonzero value that a tiny std would then blow up, so such groups are zeroed explicitly.
    With group_size 1 every group is constant, so every advantage is 0 (not NaN from std of 1 value).
    """
    grouped = scores.reshape(-1, group_size).to(torch.promote_types(scores.dtype, torch.float32))  # (B, n)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B, n)
    if scale_by_std and group_size > 1:
        std = grouped.std(dim=1, keepdim=True, correction=1 if unbiased else 0)  # (B, 1)
        centered = centered / (std + eps)  # (B, n)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (B, 1)
    return torch.where(constant, 0.0, centered).reshape(-1)  # (B·n,)
