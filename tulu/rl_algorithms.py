"""The RL algorithms of train/rlvr.py, one table row each: the advantage estimator, the policy loss,
whether a value model is trained, where the KL to the reference goes, and the clip range.

| algo | advantages | policy loss | value model | KL | source |
|---|---|---|---|---|---|
| ppo | GAE on per-token rewards | clipped surrogate, token mean | yes | in the reward | Tulu 3 (open-instruct @ e363290) |
| grpo | (s − mean_g)/std_g | clipped surrogate + β·KL | no | in the loss | Shao et al. 2024 (DeepSeekMath) |
| dr_grpo | s − mean_g | grpo's, summed over tokens / (sequences · response_length) | no | in the loss | Liu et al. 2025 |
| dapo | (s − mean_g)/std_g | clip-higher (ε_low, ε_high), token mean over the global mini-batch; overlong shaping; uninformative groups dropped | no | in the loss | Yu et al. 2025 |
| gspo | (s − mean_g)/std_g | clipped sequence-level ratio (π_θ/π_old)^(1/|y|) | no | in the loss | Zheng et al. 2025 |

Every loss here has the signature (new, old, ref, advantages, mask, cfg, token_weights) -> (loss,
metrics): log-probs (B, T), advantages (B,) per response or (B, T) per token, mask (B, T), cfg a
`LossConfig`, token_weights (B, T) the rollout correction's (tulu/rollout_correction.py) or None.
The three papers ran without the KL term: `--beta 0` reproduces them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tulu.advantages import gae, grpo_advantages, whiten_global
from tulu.ops import masked_mean, masked_var, masked_whiten
from tulu.rl_losses import grpo_policy_loss, kl_penalty, ppo_policy_loss, ppo_rewards, rlvr_scores


@dataclass(frozen=True)
class LossConfig:
    cliprange: float  # ε (ε_low with a separate ε_high)
    cliprange_high: float  # ε_high (= ε but for dapo and gspo)
    beta: float  # KL coefficient (in the loss; ppo's is in the reward)
    kl_estimator: str
    grpo_normalization: str = "token"
    response_length: int = 0  # dr_grpo's constant


def ppo_loss(new, old, ref, advantages, mask, cfg: LossConfig, token_weights=None):
    return ppo_policy_loss(new, old, advantages, mask, cfg.cliprange, token_weights=token_weights)


def grpo_loss(new, old, ref, advantages, mask, cfg: LossConfig, token_weights=None):
    return grpo_policy_loss(new, old, ref, advantages, mask, cfg.cliprange, cfg.beta, cfg.kl_estimator,
                            cfg.grpo_normalization, token_weights=token_weights)


def dr_grpo_loss(new, old, ref, advantages, mask, cfg: LossConfig, token_weights=None):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", §3.1):
    no 1/|o_i| length normalization: Σ_i Σ_t l_{i,t} / (G · L_max), a constant denominator."""
    return grpo_policy_loss(new, old, ref, advantages, mask, cfg.cliprange, cfg.beta, cfg.kl_estimator, "token",
                            loss_normalizer=new.shape[0] * cfg.response_length, token_weights=token_weights)


def dapo_loss(new, old, ref, advantages, mask, cfg: LossConfig, token_weights=None):
    """DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 8):
    clip(ρ, 1 − ε_low, 1 + ε_high) and a token-level mean over every token of the mini-batch (all
    micro-batches and ranks), so long responses weigh by their length. Returns the micro-batch's token
    SUM: the script divides by the mini-batch's global token count (Algorithm.global_token_mean)."""
    return grpo_policy_loss(new, old, ref, advantages, mask, cfg.cliprange, cfg.beta, cfg.kl_estimator, "token",
                            loss_normalizer=1.0, token_weights=token_weights,
                            cliprange_high=cfg.cliprange_high)


def gspo_loss(new, old, ref, advantages, mask, cfg: LossConfig, token_weights=None):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): the importance ratio of
    a whole response, s_i = exp(mean_t (log π_θ − log π_old)), clipped to [1 − ε_low, 1 + ε_high]:
    loss = mean_i max(−A_i·s_i, −A_i·clip(s_i)) (+ β·KL token mean). Rollout-correction weights act
    per response (their mean over its tokens)."""
    mask = mask.bool()
    adv = advantages if advantages.dim() == 1 else masked_mean(advantages, mask, dim=1)  # (B,)
    log_s = masked_mean(torch.where(mask, new - old.detach(), 0.0), mask, dim=1)  # (B,)
    s = log_s.exp()  # (B,)
    surrogate = torch.max(-adv.detach() * s, -adv.detach() * s.clamp(1 - cfg.cliprange, 1 + cfg.cliprange_high))  # (B,)
    if token_weights is not None:
        surrogate = surrogate * masked_mean(token_weights.detach(), mask, dim=1)  # (B,)
    loss = surrogate.mean()
    kl = kl_penalty(new, ref.detach(), cfg.kl_estimator, log_ratio_clamp=40.0)  # (B, T)
    if cfg.beta:
        loss = loss + cfg.beta * masked_mean(kl, mask)
    with torch.no_grad():
        delta = torch.where(mask, new - old, 0.0)  # (B, T)
        metrics = {"policy/approxkl_avg": 0.5 * masked_mean(delta.square(), mask),
                   "policy/clipfrac_avg": ((s < 1 - cfg.cliprange) | (s > 1 + cfg.cliprange_high)).float().mean(),
                   "val/ratio": s.mean(), "val/ratio_var": masked_var(s, torch.ones_like(s, dtype=torch.bool)),
                   "loss/policy_avg": surrogate.mean(), "objective/kl": masked_mean(kl.detach(), mask),
                   "loss/total": loss.detach()}
    return loss, metrics


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: 0 up to
    max_len − buffer_len tokens, then falling linearly to −factor at max_len. lengths (B,) -> (B,)."""
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_len - buffer_len
    return -factor * ((lengths.float() - start) / buffer_len).clamp(0.0, 1.0)


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic sampling, as a filter (Yu et al. 2025 §3.2): False for every response of a group
    whose scores are all equal (advantage 0, no gradient; DAPO resamples to refill the batch, we
    train on the rest). scores (B·n,) -> (B·n,) bool."""
    grouped = scores.reshape(-1, group_size)  # (B, n)
    varied = grouped.amax(1) != grouped.amin(1)  # (B,)
    return varied.repeat_interleave(group_size)


@dataclass(frozen=True)
class Algorithm:
    advantages: str  # "gae" | "group" (mean and std) | "group_mean" (mean only)
    policy_loss: Callable
    value_model: bool
    kl_in_reward: bool
    clip: tuple[float, float] = (0.2, 0.2)  # (ε_low, ε_high) when --cliprange / --cliprange_high are not given
    global_token_mean: bool = False  # the loss is a token sum, weighted by 1 / the mini-batch's global tokens;
    # else a micro-batch mean, weighted 1 / (grad_accum · world) as the original (tulu.losses.micro_batch_weight)
    dynamic_sampling: bool = False  # drop groups whose scores are all equal
    overlong_shaping: bool = False  # DAPO's length penalty on by default


ALGORITHMS = {
    "ppo": Algorithm("gae", ppo_loss, value_model=True, kl_in_reward=True),
    "grpo": Algorithm("group", grpo_loss, value_model=False, kl_in_reward=False),
    "dr_grpo": Algorithm("group_mean", dr_grpo_loss, value_model=False, kl_in_reward=False),
    "dapo": Algorithm("group", dapo_loss, value_model=False, kl_in_reward=False, clip=(0.2, 0.28),
                      global_token_mean=True, dynamic_sampling=True, overlong_shaping=True),
    "gspo": Algorithm("group", gspo_loss, value_model=False, kl_in_reward=False, clip=(3e-4, 4e-4)),
}


@dataclass
class RewardArgs:
    """train/rlvr.py's flags for the score a response gets (Tulu 3's values; tulu.rl_losses.rlvr_scores)."""
    apply_verifiable_reward: bool = True
    """Add verification_reward · verified (GSM8K / MATH / IFEval checkers by the row's dataset). Tulu 3's
    value (the original's default False)."""
    verification_reward: float = 10.0
    """Reward for a verified answer."""
    reward_model_multiplier: float = 0.0
    """Weight of the reward model's score (0: the RM is never built or run). Tulu 3's value (the
    original's default 1.0)."""
    non_stop_penalty: bool = True
    """Replace the score of a response that never emitted the stop token by penalty_reward_value. Tulu 3's
    value (the original's default False)."""
    penalty_reward_value: float = -10.0
    """Score of a response without the stop token (with non_stop_penalty). Tulu 3's value (the original's
    default -1.0)."""
    min_response_length: int = 0
    """A stopped response shorter than this also gets the penalty (original's contain_stop rule)."""

    def scores(self, rm_scores, verified, responses, seq_lens, stop_token_id: int):
        """rlvr_scores with these flags: (B,)."""
        return rlvr_scores(rm_scores, verified, responses, seq_lens, stop_token_id, self.reward_model_multiplier,
                           self.verification_reward, self.non_stop_penalty, self.penalty_reward_value,
                           self.min_response_length)


@dataclass
class AlgorithmArgs:
    """train/rlvr.py's flags for the algorithm (a section of its Args, which also holds response_length),
    with the values they resolve to: the algorithm's own where a flag is left unset."""
    algo: Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo"] = "ppo"
    """ppo: value model, GAE, KL in the reward (Tulu 3). grpo: group-normalized advantages, KL in the loss.
    dr_grpo: no std division, token sums over a constant (Liu et al. 2025). dapo: clip-higher, a token
    mean over the global mini-batch, overlong shaping, groups of equal correctness dropped (Yu et al.
    2025). gspo: a clipped sequence-level ratio (Zheng et al. 2025). Table: tulu/rl_algorithms.py."""
    beta: float = 0.05
    """KL coefficient against the reference (initial) policy."""
    kl_estimator: Literal["auto", "kl1", "kl2", "kl3"] = "auto"
    """kl1 = logp − ref, kl2 = ½·kl1², kl3 = exp(−kl1) − 1 + kl1. auto: kl1 for ppo (in the reward, as
    Tulu 3), kl3 for grpo (in the loss: kl1's gradient there just lowers every sampled token's log-prob)."""
    cliprange: float | None = None
    """Ratio clip ε (the lower one, 1 − ε, with cliprange_high). Default: the algorithm's: 0.2 (the
    original's; DAPO's ε_low), gspo 3e-4 (the GSPO paper's)."""
    cliprange_high: float | None = None
    """Upper ratio clip 1 + ε_high. Default: cliprange; dapo 0.28, gspo 4e-4 (their papers')."""
    overlong_buffer_len: int | None = None
    """DAPO's soft overlong punishment: the score falls linearly by up to overlong_penalty_factor over
    the last N response tokens. Default: dapo response_length // 5 (DAPO's 4096 of 20480), else 0 (off)."""
    overlong_penalty_factor: float = 1.0
    """Largest overlong penalty (DAPO's 1, on its ±1 rewards; ours are verification_reward = 10)."""
    dynamic_sampling: bool | None = None
    """Drop prompts whose samples are all verified or all not (no signal) from the loss. DAPO resamples
    to refill the batch; here the step trains on the rest. Default: on for dapo."""
    cliprange_value: float = 0.2
    """Value clip."""
    vf_coef: float = 0.1
    """Value loss weight."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (mean kept) before GAE."""
    grpo_loss_normalization: Literal["token", "sequence"] = "token"
    """GRPO: mean over the micro-batch's tokens, or per-sequence means (see Dr. GRPO, Liu et al. 2025)."""
    rollout_correction: Literal["none", "tis", "mis", "icepop"] = "none"
    """Importance weights for the engine's samples (tulu/rollout_correction.py): none (Tulu 3), tis
    (truncated, Yao et al. 2025), mis (masked: out-of-band tokens leave the loss), icepop (Ling team 2025)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """Per-token ratios, or each response's product of them on all its tokens."""
    rollout_correction_cap: float = 2.0
    """tis: the weight min(ρ, cap) (open-instruct's rho correction clamps at 2)."""
    rollout_correction_band: tuple[float, float] = (0.5, 2.0)
    """mis / icepop: tokens whose ratio π_old/π_engine is outside [low, high] are masked."""
    use_vllm_logprobs: bool = False
    """Use the engine's log-probs as π_old instead of recomputing them (one forward fewer per step)."""

    @property
    def kl(self) -> str:
        """The KL estimator: kl1 in the reward (ppo), kl3 in the loss (the GRPO family), or as given."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "kl1" if ALGORITHMS[self.algo].kl_in_reward else "kl3"

    @property
    def clip(self) -> tuple[float, float]:
        """(ε_low, ε_high): the flags, else the algorithm's; one --cliprange sets both."""
        low = ALGORITHMS[self.algo].clip[0] if self.cliprange is None else self.cliprange
        if self.cliprange_high is not None:
            return low, self.cliprange_high
        return low, ALGORITHMS[self.algo].clip[1] if self.cliprange is None else low

    @property
    def overlong(self) -> int:
        """DAPO's overlong buffer in tokens (0: off)."""
        if self.overlong_buffer_len is not None:
            return self.overlong_buffer_len
        return self.response_length // 5 if ALGORITHMS[self.algo].overlong_shaping else 0

    @property
    def correction(self) -> tuple:
        """tulu.rollout_correction.rollout_correction's (mode, level, cap, band)."""
        return (self.rollout_correction, self.rollout_correction_level, self.rollout_correction_cap,
                self.rollout_correction_band)

    @property
    def filters_groups(self) -> bool:
        """Dynamic sampling: drop groups whose responses all got one verdict."""
        return ALGORITHMS[self.algo].dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling


def rollout_advantages(algo: Algorithm, scores, kl, old_values, seq_lens, resp_mask, group_size: int, beta: float,
                       gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False, all_reduce=None):
    """The advantages of one rollout batch by the algorithm's estimator.

    scores (B,), kl (B, T) per token (0 off the response), old_values (B, T) or None, seq_lens (B,),
    resp_mask (B, T). Returns (advantages (B, T) for gae else (B,), returns (B, T) or None,
    value_mask (B, T) or None, non_score (B,) the KL part of the reward as the original logs it).
    gae: the KL in the per-token reward (ppo_rewards), GAE, then whitened over the GLOBAL rollout
    batch (two all-reduces). The original whitened each rank's slice: the update depended on the
    rank count."""
    if algo.advantages == "gae":
        idx = torch.arange(kl.shape[1], device=kl.device)
        value_mask = idx[None, :] <= (seq_lens[:, None] + 1)  # (B, T): values live up to the score slot
        old_values = old_values.masked_fill(~value_mask, 0.0)
        rewards, non_score = ppo_rewards(kl, scores, seq_lens, beta)  # (B, T), (B,)
        if whiten_rewards:
            rewards = masked_whiten(rewards, value_mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, value_mask, gamma, lam)  # (B, T)
        return whiten_global(advantages, resp_mask, all_reduce), returns, value_mask, non_score
    advantages = grpo_advantages(scores, group_size, scale_by_std=algo.advantages == "group")  # (B,)
    return advantages, None, None, -beta * kl.sum(1)
