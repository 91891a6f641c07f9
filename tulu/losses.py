"""Losses as pure functions of tensors. Each returns (loss, metrics) where metrics maps a name to a
detached scalar tensor. No model, no args object, no collectives. SFT, DPO and RM losses and their
metrics are SUMS over their units (tokens, pairs): the script weighs them (`micro_batch_weight`,
below: the one normalization rule) with counts taken once per optimizer step over micro-batches and ranks.
SFT, the DPO family and the Bradley–Terry RM loss live here; KL, PPO and GRPO in tulu/rl_losses.py.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# ------------------------------------------------------------------------- normalization
# The one convention of every stage. A loss returns the SUM of its per-unit losses (tokens for SFT,
# pairs for DPO and the RM; RL losses are the original's micro-batch means, i.e. one unit each) with
# their count. The script computes each micro-batch's weight with `micro_batch_weight` BEFORE any
# backward, from counts taken over the whole optimizer step (all micro-batches, all ranks), and
# backpropagates weight · loss. FSDP sums the ranks' gradients (apply_fsdp sets its divide factor to
# 1), so the step's gradient is ∇ Σ_{ranks, micro-batches} weight · loss: the weights alone say what
# the step averages over, and `weight · count`, the micro-batch's share of the step, sums to 1.


def micro_batch_weight(count, *, global_count=None, micro_batches: int | None = None, world: int = 1):
    """(weight, share) of one micro-batch whose summed loss covers `count` units.

    global_count given:   weight = 1 / global_count: every unit of the step weighs the same (SFT
                          token_mean, DPO and RM pair means, DAPO's token mean over the global mini-batch).
    else:                 weight = 1 / (count · micro_batches · world): every micro-batch's mean weighs the
                          same (SFT mean; count = 1 for a loss that is already a mean, and for SFT sum,
                          whose micro-batch token sums the original scaled by 1/(GA·W): DeepSpeed's
                          gradient-accumulation scaling and the data-parallel mean).
    share = weight · count, what the micro-batch is of the step's objective (the shares of a step sum
    to 1): the metric weight of `weight · loss` (tulu.metrics.Metrics.add).
    """
    if global_count is not None:
        weight = 1.0 / global_count
    elif micro_batches is None:
        raise ValueError("micro_batch_weight: give global_count, or micro_batches (and world)")
    else:
        # a micro-batch with nothing to train (count 0) contributes 0 · anything; clamp keeps it finite
        count = count.clamp(min=1) if torch.is_tensor(count) else max(count, 1)
        weight = 1.0 / (count * micro_batches * world)
    return weight, weight * count


def load_balancing_loss(aux: list[torch.Tensor], weight: float, micro_batches: int, world: int):
    """A mixture-of-experts router's load-balancing loss as the original added it (open-instruct
    finetune.py:934-936 and dpo_tune.py:1007-1009 @e363290): weight · aux on each micro-batch's loss,
    which DeepSpeed then scaled by 1/(GA·W), so the step's term is weight · the mean of the micro-batches'
    aux over micro-batches and ranks. aux: the micro-batch's loss (tulu.model.router_aux_loss); empty: 0."""
    if not aux:
        return 0.0
    return weight * aux[0] * micro_batch_weight(1, micro_batches=micro_batches, world=world)[0]


# --------------------------------------------------------------------------------------- SFT

SFT_REDUCTIONS = ("mean", "sum", "token_mean")


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy of one micro-batch and its trained-token count.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on untrained positions (the shift happens here).
    Returns (Σ_t CE_t, {"tokens": n}); `sft_weight` turns the sum into the reduction's share.
    """
    shift_logits = logits[:, :-1].flatten(0, 1).float()  # (B·(T-1), V)
    shift_labels = labels[:, 1:].flatten()  # (B·(T-1),)
    ce_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")  # ()
    return ce_sum, {"tokens": (shift_labels != IGNORE_INDEX).sum().float()}


def sft_loss_from_logprobs(token_logps: torch.Tensor, targets: torch.Tensor):
    """sft_loss from per-position log-probs of the next token (tulu.lm_head, which never builds the
    logits): token_logps (B, T) fp32, 0 where targets (B, T) is IGNORE_INDEX."""
    return -token_logps.sum(), {"tokens": (targets != IGNORE_INDEX).sum().float()}


def sft_weight(reduce_loss: str, tokens, global_tokens, micro_batches: int, grad_accum: int, world: int):
    """(weight, share) of one micro-batch's summed cross-entropy for each --reduce_loss, so that the
    step's gradient g is:

    - "mean":       g = 1/(A·W) Σ_b ∇ mean_{t∈b} CE_t   (open-instruct default; HF per-batch mean;
                    A = the micro-batches this rank runs)
    - "sum":        g = 1/(A·W) Σ_b ∇ Σ_{t∈b} CE_t      (Tulu 3 runs; A = --gradient_accumulation_steps)
    - "token_mean": g = 1/N Σ_b ∇ Σ_{t∈b} CE_t          (N = trained tokens of the whole step, all ranks)

    open-instruct finetune.py @e363290 for mean and sum (its loss = outputs.loss, or the token sum, then
    accelerator.backward with gradient accumulation); token_mean is the gradient-accumulation-invariant
    form (transformers issue #24725).
    """
    if reduce_loss == "token_mean":
        return micro_batch_weight(tokens, global_count=global_tokens)
    if reduce_loss == "mean":
        return micro_batch_weight(tokens, micro_batches=micro_batches, world=world)
    if reduce_loss == "sum":
        return micro_batch_weight(1, micro_batches=grad_accum, world=world)
    raise ValueError(f"reduce_loss must be one of {SFT_REDUCTIONS}, got {reduce_loss!r}")


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
    """Implicit-reward metrics, named as the original logs them, summed over the pairs (the caller
    logs them per pair: weight = pairs). Accuracy is per pair: the original compared the batch MEANS
    of the rewards (dpo_tune.py @e363290, correct only at batch size 1)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()  # (B,), (B,)
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/average": ((chosen_rewards + rejected_rewards) / 2).sum(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen.detach().sum(),
        "logps/rejected": rejected.detach().sum(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023, eq. 7) with cDPO label smoothing ε (Mitchell 2023), summed over pairs.

    z = (πc − πr) − (rc − rr);  L = −(1−ε)·logσ(βz) − ε·logσ(−βz).
    All inputs (B,). "dpo" passes summed log-probs; "dpo_norm" (Tulu 3, β=5) passes token-averaged
    log-probs for policy AND reference. open-instruct dpo_utils.dpo_loss @e363290.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    loss = _sigmoid_pair_loss(z, beta, label_smoothing).sum()  # ()
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
    loss = _sigmoid_pair_loss(u, beta, label_smoothing).sum()  # ()
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
    token-averaged policy log-probs (B,); L = Σ_pairs w·L_dpo(summed πc, πr, rc, rr).
    Deviation: open-instruct @e363290 computed π̄ as `(πc * mask).sum(-1) / mask.sum(-1)` on the
    already-summed (B,) log-probs, which is the summed log-prob itself, not a per-token average.
    The paper's weight-alignment refinement is not implemented.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # (B,)
    weight = torch.exp(policy_chosen_avg + policy_rejected_avg).detach().clamp(max=1.0)  # (B,)
    loss = (weight * _sigmoid_pair_loss(z, beta, label_smoothing)).sum()  # ()
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    metrics = _reward_metrics(loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    metrics["wpo/weight"] = weight.sum()
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
    """Bradley–Terry pairwise reward-model loss (Ouyang et al. 2022, eq. 1): Σ_pairs −logσ(r_c − r_r);
    the metrics are sums over the pairs too.

    chosen_scores, rejected_scores: (B,) scalar rewards read at each sequence's EOS. Accuracy counts a
    tie as wrong (strict >), as open-instruct reward_modeling.py @e363290.
    """
    margin = chosen_scores - rejected_scores  # (B,)
    loss = -F.logsigmoid(margin).sum()  # ()
    margin = margin.detach()  # (B,)
    return loss, {
        "loss": loss.detach(),
        "accuracy": (margin > 0).float().sum(),
        "chosen_rewards": chosen_scores.detach().sum(),
        "rejected_rewards": rejected_scores.detach().sum(),
        "margin": margin.sum(),
    }
