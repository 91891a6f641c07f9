"""RL losses as pure functions of tensors: KL estimators, RLVR scores and per-token rewards, the PPO
clipped policy and value losses, and the GRPO policy loss (KL in the loss).

Losses return (loss, metrics) with metrics a dict of detached scalars named as open-instruct logs
them. Shapes: B = sequences, T = response tokens. `mask` is True on the tokens a loss trains on.
Sources: open-instruct ppo_vllm_thread_ray_gtrl.py:1040-1294 @e363290 (scoring, rewards, PPO update) and
grpo_vllm_thread_ray_gtrl.py from 648539372 / 8313b38e9 / 79ff8fbee.

Normalization (`loss_normalizer`): None divides by this call's valid-token count (the original:
a token mean per micro-batch, so micro-batches of different lengths get equal weight). A count
(float or 0-d tensor) divides the masked SUM by it instead: pass the step's global token count,
computed once across micro-batches and ranks before backward (divided by the world size when
FSDP averages gradients over ranks), and every token of the step weighs the same. Dr. GRPO
(Liu et al. 2025, "Understanding R1-Zero-Like Training") shows that per-sequence length
normalization biases the gradient toward long wrong answers; the global token count avoids it.
"""
from __future__ import annotations

import torch

from tulu.ops import masked_mean, masked_sum, masked_var

KL_ESTIMATORS = ("kl1", "kl2", "kl3")
GRPO_NORMALIZATIONS = ("token", "sequence")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, log_ratio_clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimators on samples from π (Schulman 2020, "Approximating KL").

    kl1 = log r with log r = lp − ref_lp (unbiased, can be negative); kl2 = ½·(log r)²;
    kl3 = exp(−log r) − 1 + log r, computed as expm1(−log r) + log r (unbiased, ≥ 0; expm1 avoids the
    cancellation of exp(x) − 1 near 0). `log_ratio_clamp` (GRPO: 40) bounds log r before exp.
    logprobs, ref_logprobs: (B, T) -> (B, T).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)  # (B, T)
    if estimator == "kl1":
        return log_ratio
    if estimator == "kl2":
        return 0.5 * log_ratio.square()  # (B, T)
    if estimator == "kl3":
        return torch.expm1(-log_ratio) + log_ratio  # (B, T)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def rlvr_scores(
    rm_scores: torch.Tensor | None,
    verified: torch.Tensor,
    responses: torch.Tensor,
    seq_lens: torch.Tensor,
    stop_token_id: int,
    reward_model_multiplier: float = 1.0,
    verification_reward: float = 10.0,
    non_stop_penalty: bool = False,
    penalty_reward_value: float = -1.0,
    min_response_length: int = 0,
) -> torch.Tensor:
    """The scalar RLVR score of each response (open-instruct ppo_vllm_thread_ray_gtrl.py:1095-1153 @e363290).

    score = rm_score·reward_model_multiplier + verification_reward·verified, then, with
    non_stop_penalty, score = penalty_reward_value wherever NOT contain_stop, where
    contain_stop = any(response == stop) & (seq_len ≥ min_response_length). So the penalty also hits
    a response that stops but is shorter than min_response_length, exactly as the original.
    rm_scores: (B,) or None (RM not run: multiplier 0); verified: (B,) bool/0-1;
    responses: (B, T) post-processed (pad after the first stop); seq_lens: (B,) index of the last
    valid token (the stop token; T−1 when none), i.e. a response of n tokens has seq_len n−1.
    """
    score = verification_reward * verified.to(torch.float32)  # (B,)
    if rm_scores is not None:
        score = score + rm_scores.float() * reward_model_multiplier  # (B,)
    if non_stop_penalty:
        contain_stop = (responses == stop_token_id).any(dim=1) & (seq_lens >= min_response_length)  # (B,)
        score = torch.where(contain_stop, score, torch.full_like(score, penalty_reward_value))  # (B,)
    return score


def ppo_rewards(
    kl: torch.Tensor, scores: torch.Tensor, seq_lens: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards with the KL folded in (Ziegler et al. 2019;
    open-instruct ppo_vllm_thread_ray_gtrl.py:1177-1183 @e363290).

    r_t = −β·kl_t on valid tokens t ≤ seq_len (0 after), plus the scalar score at
    seq_len + 1 when that is < T, else at seq_len (no stop token): the original puts the score ONE
    position after EOS, where the value target sees it but the policy loss mask does not.
    kl: (B, T) from kl_penalty; scores: (B,); seq_lens: (B,) int64 index of the last valid token.
    Returns rewards (B, T) and non_score_reward (B,) = Σ_t −β·kl_t (objective/rlhf_reward = score + it).
    """
    T = kl.shape[1]
    idx = torch.arange(T, device=kl.device)  # (T,)
    valid = idx[None, :] <= seq_lens[:, None]  # (B, T)
    per_token = torch.where(valid, -beta * kl, 0.0)  # (B, T)
    end = torch.where(seq_lens + 1 < T, seq_lens + 1, seq_lens)  # (B,)
    rewards = per_token.scatter_add(1, end[:, None], scores[:, None].to(per_token.dtype))  # (B, T)
    return rewards, per_token.sum(1)


def _clipped_surrogate(
    new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float, cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip per token (Schulman et al. 2017, eq. 7), as a loss: max(−A·ρ, −A·clip(ρ, 1−c, 1+c));
    with cliprange_high, clip(ρ, 1 − c, 1 + c_high) (DAPO's clip-higher).

    Returns pg_loss (B, T), ratio ρ (B, T), clipped (B, T) bool (the clipped branch was taken).
    The log-ratio is zeroed off the mask (ρ = 1 there, as the original's INVALID_LOGPROB = 1.0 in
    both old and new gives), so garbage in padded positions cannot overflow exp and NaN the sum.
    """
    ratio = torch.exp(torch.where(mask.bool(), new_logprobs - old_logprobs, 0.0))  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)  # (B, T)
    return torch.max(pg_losses, pg_losses2), ratio, pg_losses2 > pg_losses


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, loss_normalizer) -> torch.Tensor:
    """Masked token mean within the call (None) or masked sum / an explicit normalizer."""
    if loss_normalizer is None:
        return masked_mean(per_token, mask)
    return masked_sum(per_token, mask) / loss_normalizer


def _policy_metrics(new_logprobs, old_logprobs, ratio, clipped, pg_loss, mask) -> dict[str, torch.Tensor]:
    """approxkl = ½·mean(Δlp²) over VALID tokens (the original averaged over padding too, where
    Δlp = 0, diluting it by the padding fraction); ratio stats are per valid token (the original's
    val/ratio_var was the variance of per-micro-batch mean ratios)."""
    with torch.no_grad():
        delta = torch.where(mask.bool(), new_logprobs - old_logprobs, 0.0)  # (B, T)
        return {
            "policy/approxkl_avg": 0.5 * masked_mean(delta.square(), mask),
            "policy/clipfrac_avg": masked_mean(clipped.float(), mask),
            "val/ratio": masked_mean(ratio, mask),
            "val/ratio_var": masked_var(ratio, mask),
            "loss/policy_avg": masked_mean(pg_loss, mask),
        }


def ppo_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    loss_normalizer: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss, Tulu 3 RLVR (open-instruct ppo_vllm_thread_ray_gtrl.py:1253-1259 @e363290):
    no KL term (it is in the rewards).

    new_logprobs (B, T) carries the gradient; old_logprobs, advantages (B, T) are constants from the
    rollout; mask (B, T) = tokens 0..seq_len. token_weights (B, T): rollout-correction importance
    weights (tulu/rollout_correction.py) on each token's surrogate; None = 1. Normalization: see
    the module docstring.
    """
    pg_loss, ratio, clipped = _clipped_surrogate(new_logprobs, old_logprobs.detach(), advantages.detach(), mask, cliprange)
    if token_weights is not None:
        pg_loss = pg_loss * token_weights.detach()  # (B, T)
    loss = _reduce(pg_loss, mask, loss_normalizer)  # ()
    return loss, _policy_metrics(new_logprobs, old_logprobs, ratio, clipped, pg_loss, mask)


def ppo_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    loss_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss (Tulu 3 RLVR, open-instruct ppo_vllm_thread_ray_gtrl.py:1236-1245 @e363290;
    the clip is from OpenAI baselines).

    v_clip = clamp(v, v_old − c, v_old + c); L = ½·mean(max((v − R)², (v_clip − R)²)).
    All (B, T); mask is one token longer than the policy's (0..seq_len+1: the score position).
    vf_coef is the caller's multiplier. Normalization: see the module docstring.
    """
    old_values, returns = old_values.detach(), returns.detach()  # (B, T), (B, T)
    v_clipped = new_values.clamp(old_values - cliprange_value, old_values + cliprange_value)  # (B, T)
    vf_losses1 = (new_values - returns).square()  # (B, T)
    vf_losses2 = (v_clipped - returns).square()  # (B, T)
    per_token = 0.5 * torch.max(vf_losses1, vf_losses2)  # (B, T)
    loss = _reduce(per_token, mask, loss_normalizer)  # ()
    with torch.no_grad():
        metrics = {
            "val/clipfrac_avg": masked_mean((vf_losses2 > vf_losses1).float(), mask),
            "loss/value_avg": masked_mean(per_token, mask),
        }
    return loss, metrics


def grpo_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    beta: float,
    kl_estimator: str = "kl3",
    normalization: str = "token",
    loss_normalizer: float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy loss (Shao et al. 2024, DeepSeekMath eq. 3; open-instruct grpo_vllm_thread_ray_gtrl).

    per token: max(−A·ρ, −A·clip(ρ, 1±c)) + β·KL(π_new‖π_ref), the KL recomputed from new_logprobs so
    it is differentiable (8313b38e9), with log(π_new/π_ref) clamped to ±40 before exp (79ff8fbee).
    advantages: (B,) group-normalized (broadcast over tokens) or (B, T); logprobs and mask (B, T).
    normalization "token": Σ over valid tokens / (this call's token count, or loss_normalizer);
    "sequence": each sequence's token mean, then Σ over sequences / (B, or loss_normalizer = the
    step's global sequence count). "sequence" is the paper's 1/|o_i| form that Dr. GRPO criticizes.
    token_weights (B, T): rollout-correction weights on the surrogate (not on the KL term).
    cliprange_high: the upper clip 1 + cliprange_high (DAPO); None = symmetric.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(new_logprobs)  # (B, T)
    pg_loss, ratio, clipped = _clipped_surrogate(new_logprobs, old_logprobs.detach(), advantages.detach(), mask,
                                                 cliprange, cliprange_high)
    if token_weights is not None:
        pg_loss = pg_loss * token_weights.detach()  # (B, T)
    kl = kl_penalty(new_logprobs, ref_logprobs.detach(), kl_estimator, log_ratio_clamp=40.0)  # (B, T)
    per_token = pg_loss + beta * kl  # (B, T)
    if normalization == "token":
        loss = _reduce(per_token, mask, loss_normalizer)  # ()
    elif normalization == "sequence":
        per_seq = masked_mean(per_token, mask, dim=1)  # (B,)
        loss = per_seq.sum() / (per_seq.shape[0] if loss_normalizer is None else loss_normalizer)  # ()
    else:
        raise ValueError(f"normalization must be one of {GRPO_NORMALIZATIONS}, got {normalization!r}")
    metrics = _policy_metrics(new_logprobs, old_logprobs, ratio, clipped, pg_loss, mask)
    metrics["objective/kl"] = masked_mean(kl.detach(), mask)
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def rollout_metrics(old_logprobs, engine_logprobs, mask, kl, scores, verified, non_score, seq_lens,
                    is_stop) -> dict[str, torch.Tensor]:
    """A rollout batch's objective/* and val/* metrics, named as the original logs them (open-instruct
    ppo_vllm_thread_ray_gtrl.py:1297-1346 @e363290),
    and debug/engine_logprob_diff: the trainer's vs the engine's log-probs of the sampled tokens,
    ~0 in sync mode (same weights: fp noise), one version apart in async mode; large in sync mode =
    a broken sync. (B, T) tensors but scores, verified, non_score, seq_lens (B,); is_stop (B, T) bool."""
    with torch.no_grad():
        return {
            "debug/engine_logprob_diff": masked_mean((old_logprobs - engine_logprobs).abs(), mask),
            "objective/kl": kl.sum(1).mean(),
            "objective/scores": scores.mean(),
            "objective/verifiable_correct_rate": (verified > 0).float().mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (scores + non_score).mean(),
            "objective/entropy": (-old_logprobs * mask).sum(1).mean(),  # a sampled-NLL proxy, as the original
            "val/sequence_lengths": (seq_lens + 1).float().mean(),
            "val/stop_token_rate": is_stop.any(1).float().mean(),
        }
