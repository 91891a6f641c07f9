"""Losses as pure functions of tensors. Each returns (loss, metrics) where metrics maps a name to a
detached scalar tensor. No model, no args object, no collectives: the caller passes every count
that normalizes a loss (computed once per optimizer step, across micro-batches and ranks).
SFT, the DPO family and the Bradley–Terry RM loss live here; KL, PPO and GRPO in tulu/rl_losses.py.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# --------------------------------------------------------------------------------------- SFT

SFT_REDUCTIONS = ("mean", "sum", "token_mean")


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduce_loss: str,
    grad_accum: int,
    world: int,
    global_tokens: torch.Tensor | float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy for one micro-batch, scaled for the chosen reduction.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on untrained positions (the shift happens here).
    The returned loss is what this micro-batch backpropagates. FSDP averages gradients over `world`
    ranks and we sum over `grad_accum` micro-batches, so the applied gradient g is:

    - "mean":       g = 1/(A·W) Σ_b ∇ mean_{t∈b} CE_t   (open-instruct default; HF per-batch mean)
    - "sum":        g = 1/(A·W) Σ_b ∇ Σ_{t∈b} CE_t      (Tulu 3 runs: DeepSpeed's GA scaling + DP mean)
    - "token_mean": g = 1/N Σ_b ∇ Σ_{t∈b} CE_t          (N = trained tokens in the whole step, all ranks)

    open-instruct finetune.py @e363290 for mean/sum (see shared reference §2.3); token_mean is the
    gradient-accumulation-invariant form (transformers issue #24725).
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # (B·(T-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B·(T-1),)
    ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")  # ()
    return _sft_reduce(ce_sum, (shift_labels != IGNORE_INDEX).sum(), reduce_loss, grad_accum, world, global_tokens)


def sft_loss_from_logprobs(token_logps: torch.Tensor, targets: torch.Tensor, reduce_loss: str, grad_accum: int,
                           world: int, global_tokens: torch.Tensor | float):
    """sft_loss from per-position log-probs of the next token (tulu.lm_head, which never builds the
    logits): token_logps (B, T) fp32, 0 where targets (B, T) is IGNORE_INDEX. Same reductions."""
    return _sft_reduce(-token_logps.sum(), (targets != IGNORE_INDEX).sum(), reduce_loss, grad_accum, world,
                       global_tokens)


def _sft_reduce(ce_sum, n_tokens, reduce_loss, grad_accum, world, global_tokens):
    if reduce_loss == "mean":
        loss = ce_sum / n_tokens.clamp(min=1) / grad_accum
    elif reduce_loss == "sum":
        loss = ce_sum / grad_accum
    elif reduce_loss == "token_mean":
        loss = ce_sum * world / global_tokens  # FSDP's mean over ranks divides the W back out
    else:
        raise ValueError(f"reduce_loss must be one of {SFT_REDUCTIONS}, got {reduce_loss!r}")
    return loss, {"ce_sum": ce_sum.detach(), "tokens": n_tokens.detach().float()}


# -------------------------------------------------------------------------------- DPO family
# Inputs are per-sequence log-probs (B,) from `tulu.ops.sequence_logps`. Which reduction (sum or
# token mean) the caller feeds is part of the loss type: see DPO_LOSSES below.


def _sigmoid_pair_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·logσ(β·x) − ε·logσ(−β·x) per pair: (B,) -> (B,). ε > 0 is conservative DPO (cDPO)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _reward_metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Implicit-reward metrics, named as the original logs them. Accuracy is per pair: the original
    compared the batch MEANS of the rewards (dpo_tune.py @e363290, correct only at batch size 1)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()  # (B,), (B,)
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/average": ((chosen_rewards + rejected_rewards) / 2).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.detach().mean(),
        "logps/rejected": rejected.detach().mean(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7) with cDPO label smoothing ε (Mitchell 2023), mean over pairs.

    z = (πc − πr) − (rc − rr);  L = −(1−ε)·logσ(βz) − ε·logσ(−βz).
    All inputs (B,). "dpo" passes summed log-probs; "dpo_norm" (Tulu 3, β=5) passes token-averaged
    log-probs for policy AND reference. open-instruct dpo_utils.dpo_loss @e363290.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    loss = _sigmoid_pair_loss(z, beta, label_smoothing).mean()  # ()
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


def simpo_loss(
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalized, with a target margin γ.

    u = (π̄c − π̄r) − γ/β;  L = −(1−ε)·logσ(βu) − ε·logσ(−βu). Inputs are token-averaged (B,).
    The margin is passed as the ratio γ/β (open-instruct `dpo_gamma_beta_ratio`, default 0.3), so
    βu = β(π̄c − π̄r) − γ as in the paper. Implicit rewards are β·π̄.
    """
    u = (policy_chosen_avg - policy_rejected_avg) - gamma_beta_ratio  # (B,)
    loss = _sigmoid_pair_loss(u, beta, label_smoothing).mean()  # ()
    chosen_rewards, rejected_rewards = beta * policy_chosen_avg, beta * policy_rejected_avg  # (B,), (B,)
    return loss, _reward_metrics(loss, chosen_rewards, rejected_rewards, policy_chosen_avg, policy_rejected_avg)


def wpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    policy_chosen_avg: torch.Tensor,
    policy_rejected_avg: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """WPO (Zhou et al. 2024, "Enhancing RLHF with Weighted Preference Optimization"): the DPO loss
    of each pair weighted by how likely the current policy is to produce both responses.

    w = clamp(exp(π̄c + π̄r), max=1), DETACHED (a weight, not a path for gradient), with π̄ the
    token-averaged policy log-probs (B,); L = mean_pairs w·L_dpo(summed πc, πr, rc, rr).
    Deviation: open-instruct @e363290 computed π̄ as `(πc * mask).sum(-1) / mask.sum(-1)` on the
    already-summed (B,) log-probs, which is the summed log-prob itself, not a per-token average.
    The paper's weight-alignment refinement is not implemented.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    weight = torch.exp(policy_chosen_avg + policy_rejected_avg).detach().clamp(max=1.0)  # (B,)
    loss = (weight * _sigmoid_pair_loss(z, beta, label_smoothing)).mean()  # ()
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    metrics = _reward_metrics(loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    metrics["wpo/weight"] = weight.mean()
    return loss, metrics


# ------------------------------------------------------------------- DPO dispatch (once, by name)
# Uniform call for every entry (keywords after the four log-prob vectors):
#   loss, metrics = DPO_LOSSES[t].fn(pc, pr, rc, rr, beta=..., label_smoothing=..., gamma_beta_ratio=...,
#                                    policy_chosen_avg=..., policy_rejected_avg=...)
# pc/pr/rc/rr are (B,) in the reduction `average_log_prob` names; rc/rr may be None when
# `needs_reference` is False; the *_avg vectors are read only by wpo (`needs_policy_average`).


class DPOLossType(NamedTuple):
    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    average_log_prob: bool  # token-averaged (True) or summed (False) log-probs for pc/pr/rc/rr
    needs_reference: bool  # False: no reference model and no reference cache at all
    needs_policy_average: bool  # also pass token-averaged policy log-probs (wpo's weight)


def _dpo_entry(pc, pr, rc, rr, *, beta, label_smoothing=0.0, **_unused):
    return dpo_loss(pc, pr, rc, rr, beta, label_smoothing)


def _simpo_entry(pc, pr, rc=None, rr=None, *, beta, gamma_beta_ratio, label_smoothing=0.0, **_unused):
    return simpo_loss(pc, pr, beta, gamma_beta_ratio, label_smoothing)


def _wpo_entry(pc, pr, rc, rr, *, beta, policy_chosen_avg, policy_rejected_avg, label_smoothing=0.0, **_unused):
    return wpo_loss(pc, pr, rc, rr, policy_chosen_avg, policy_rejected_avg, beta, label_smoothing)


DPO_LOSSES: dict[str, DPOLossType] = {
    "dpo": DPOLossType(_dpo_entry, average_log_prob=False, needs_reference=True, needs_policy_average=False),
    "dpo_norm": DPOLossType(_dpo_entry, average_log_prob=True, needs_reference=True, needs_policy_average=False),
    "simpo": DPOLossType(_simpo_entry, average_log_prob=True, needs_reference=False, needs_policy_average=False),
    "wpo": DPOLossType(_wpo_entry, average_log_prob=False, needs_reference=True, needs_policy_average=True),
}


# ------------------------------------------------------------------------------ reward model


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry pairwise reward-model loss (Ouyang et al. 2022, eq. 1): −logσ(r_c − r_r), mean.

    chosen_scores, rejected_scores: (B,) scalar rewards read at each sequence's EOS. Accuracy counts a
    tie as wrong (strict >), as open-instruct reward_modeling.py @e363290.
    """
    margin = chosen_scores - rejected_scores  # (B,)
    loss = -F.logsigmoid(margin).mean()  # ()
    margin = margin.detach()  # (B,)
    return loss, {
        "loss": loss.detach(),
        "accuracy": (margin > 0).float().mean(),
        "chosen_rewards": chosen_scores.detach().mean(),
        "rejected_rewards": rejected_scores.detach().mean(),
        "margin": margin.mean(),
    }
