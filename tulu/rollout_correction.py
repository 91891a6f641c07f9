"""Rollout correction: importance weights for samples the engine drew from a policy μ that is not
the trainer's π_old, as pure functions of tensors.

The trainer's PPO/GRPO ratio is π_θ/π_old with π_old the trainer's own recompute (the original's
choice). The tokens were sampled by the engine: one version behind in async mode, and through
other kernels (bf16 weights in vLLM). Token t of a response has the behaviour ratio

    ρ_t = π_old(y_t) / μ(y_t) = exp(old_logprob_t − behaviour_logprob_t)

(both log-probs after temperature, over the full vocabulary: what TorchEngine and vLLM's
processed log-probs report). At `level="sequence"` every token of a response takes the
sequence's ratio exp(Σ_t log ρ_t). The methods:

- `tis`, truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training", fengyao.notion.site): weight min(ρ, cap) on every token.
- `mis`, masked importance sampling (the "mask" mode of the same line of work, as verl#3915 and
  slime#657 implement it): weight ρ where low ≤ ρ ≤ high; tokens (or whole sequences) outside the
  band are rejected, i.e. left out of the loss AND of its token count (the mask returned).
- `icepop` (Ling team 2025, "Small Leak Can Sink a Great Ship: Boost RL Training on MoE with
  IcePop"): weight ρ inside the band, 0 outside; masked tokens stay in the normalizer (the paper's
  1/Σ|y| over every token).
- `none`: weight 1 (Tulu 3).

The weight multiplies the per-token policy-gradient loss (PPO's clipped surrogate; in GRPO not the
KL term) and carries no gradient. Metrics (`rollout_corr/*`): the K3 estimate of KL(μ‖π_old) on
the engine's samples (Schulman 2020: ρ − 1 − log ρ), the ratio's mean/min/max, the fraction of
tokens capped (tis) or masked (mis, icepop), and the largest per-sequence |log ρ_t|.
"""
from __future__ import annotations

import torch

from tulu.ops import masked_mean

METHODS = ("none", "tis", "mis", "icepop")
LEVELS = ("token", "sequence")


def behaviour_ratio(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                    level: str = "token") -> torch.Tensor:
    """log ρ per token (B, T): token-level, or each sequence's Σ_t log ρ_t on all of its tokens; 0 off the mask."""
    log_ratio = torch.where(mask.bool(), old_logprobs - behaviour_logprobs, 0.0).float()  # (B, T)
    if level == "token":
        return log_ratio
    if level == "sequence":
        return torch.where(mask.bool(), log_ratio.sum(1, keepdim=True), 0.0)  # (B, T)
    raise ValueError(f"rollout correction level must be one of {LEVELS}, got {level!r}")


def rollout_correction(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       method: str = "none", level: str = "token", cap: float = 2.0,
                       band: tuple[float, float] = (0.5, 2.0)) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Importance weights for the policy loss. All (B, T); returns (weights, loss mask, metrics).

    weights: detached, 1 where no correction applies; loss mask: `mask` less the tokens `mis`
    rejects (use it for the loss and its token count); metrics: detached scalars.
    """
    if method not in METHODS:
        raise ValueError(f"rollout correction must be one of {METHODS}, got {method!r}")
    low, high = band
    if not 0 <= low <= 1 <= high or cap < 1:
        raise ValueError(f"rollout correction: need cap >= 1 and low <= 1 <= high, got cap {cap}, band {band}")
    with torch.no_grad():
        mask = mask.bool()
        log_ratio = behaviour_ratio(old_logprobs, behaviour_logprobs, mask, level)  # (B, T)
        ratio = log_ratio.clamp(max=80.0).exp()  # (B, T): the clamp only keeps exp finite
        inside = (ratio >= low) & (ratio <= high)  # (B, T)
        if method == "none":
            weights, loss_mask, hit = torch.ones_like(ratio), mask, torch.zeros_like(mask)
        elif method == "tis":
            weights, loss_mask, hit = ratio.clamp(max=cap), mask, mask & (ratio > cap)
        elif method == "mis":
            weights, loss_mask, hit = torch.where(inside, ratio, 0.0), mask & inside, mask & ~inside
        else:  # icepop
            weights, loss_mask, hit = torch.where(inside, ratio, 0.0), mask, mask & ~inside
        token_log_ratio = behaviour_ratio(old_logprobs, behaviour_logprobs, mask, "token")  # (B, T)
        metrics = {
            "rollout_corr/kl_k3": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
            "rollout_corr/ratio_mean": masked_mean(ratio, mask),
            "rollout_corr/ratio_min": ratio.masked_fill(~mask, float("inf")).min(),
            "rollout_corr/ratio_max": ratio.masked_fill(~mask, float("-inf")).max(),
            "rollout_corr/corrected_frac": masked_mean(hit.float(), mask),
            "rollout_corr/seq_max_gap": token_log_ratio.abs().amax(1).max(),
        }
    return torch.where(mask, weights, 0.0), loss_mask, metrics
