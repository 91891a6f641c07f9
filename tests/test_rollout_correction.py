"""Rollout correction (tulu/rollout_correction.py) against hand-written loops on random inputs, and
its use in the PPO / GRPO losses."""
from __future__ import annotations

import math

import pytest
import torch

from tulu.rl_losses import grpo_policy_loss, ppo_policy_loss
from tulu.rollout_correction import rollout_correction

CAP, BAND = 1.5, (0.7, 1.4)


def random_inputs(seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3  # (B, T) log-probs
    behaviour = old + 0.4 * torch.randn(B, T, generator=g)  # another policy's log-probs of the same tokens
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return old, behaviour, mask


def reference(old, behaviour, mask, method, level):
    """One token at a time: (weights, loss mask, corrected count)."""
    B, T = old.shape
    weights, keep, hits = [[0.0] * T for _ in range(B)], [[False] * T for _ in range(B)], 0
    for b in range(B):
        seq = math.exp(sum(float(old[b, t] - behaviour[b, t]) for t in range(T) if mask[b, t]))
        for t in range(T):
            if not mask[b, t]:
                continue
            rho = seq if level == "sequence" else math.exp(float(old[b, t] - behaviour[b, t]))
            inside = BAND[0] <= rho <= BAND[1]
            if method == "none":
                w, k, hit = 1.0, True, False
            elif method == "tis":
                w, k, hit = min(rho, CAP), True, rho > CAP
            elif method == "mis":
                w, k, hit = (rho if inside else 0.0), inside, not inside
            else:  # icepop
                w, k, hit = (rho if inside else 0.0), True, not inside
            weights[b][t], keep[b][t], hits = w, k, hits + hit
    return torch.tensor(weights), torch.tensor(keep), hits


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("method", ["none", "tis", "mis", "icepop"])
def test_weights_and_masks_match_the_definitions(method, level):
    old, behaviour, mask = random_inputs(seed=len(method) * 10 + len(level))  # fixed per case
    weights, loss_mask, metrics = rollout_correction(old, behaviour, mask, method, level, CAP, BAND)
    want_w, want_keep, hits = reference(old, behaviour, mask, method, level)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-6)
    assert loss_mask.tolist() == (want_keep & mask).tolist()
    assert metrics["rollout_corr/corrected_frac"].item() == pytest.approx(hits / mask.sum().item())
    if method != "none" and level == "token":
        assert 0 < hits < mask.sum()  # the random gaps straddle the cap and the band: the test can fail
    log_rho = (old - behaviour)[mask]
    assert metrics["rollout_corr/kl_k3"].item() == pytest.approx((log_rho.exp() - 1 - log_rho).mean().item(), rel=1e-5)
    assert metrics["rollout_corr/seq_max_gap"].item() == pytest.approx(log_rho.abs().max().item())


def test_matched_policies_are_left_alone():
    old, _, mask = random_inputs()
    for method in ("tis", "mis", "icepop"):
        weights, loss_mask, metrics = rollout_correction(old, old.clone(), mask, method, "token", CAP, BAND)
        assert torch.equal(weights, mask.float()) and torch.equal(loss_mask, mask)
        assert metrics["rollout_corr/corrected_frac"] == 0 and metrics["rollout_corr/kl_k3"] == 0


def test_bad_options_are_errors():
    old, behaviour, mask = random_inputs()
    with pytest.raises(ValueError, match="must be one of"):
        rollout_correction(old, behaviour, mask, "clip")
    with pytest.raises(ValueError, match="level must be one of"):
        rollout_correction(old, behaviour, mask, "tis", "batch")
    with pytest.raises(ValueError, match="low <= 1 <= high"):
        rollout_correction(old, behaviour, mask, "mis", band=(1.1, 2.0))


def test_weights_scale_the_policy_gradient_term():
    """PPO: the loss with weights is Σ w·surrogate / tokens; GRPO: the KL term is not weighted."""
    old, behaviour, mask = random_inputs(seed=3)
    new = (old + 0.05 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn_like(old)
    weights, loss_mask, _ = rollout_correction(old, behaviour, mask, "icepop", "token", CAP, BAND)
    plain, _ = ppo_policy_loss(new, old, adv, loss_mask, 0.2)
    weighted, _ = ppo_policy_loss(new, old, adv, loss_mask, 0.2, token_weights=weights)
    ratio = (new - old).exp()
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert plain.item() == pytest.approx((surrogate * loss_mask).sum().item() / loss_mask.sum().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((weights * surrogate * loss_mask).sum().item() / loss_mask.sum().item(), rel=1e-5)
    ones, _ = ppo_policy_loss(new, old, adv, loss_mask, 0.2, token_weights=torch.ones_like(old))
    assert ones.item() == pytest.approx(plain.item())
    ref = old - 0.1
    zero = torch.zeros_like(old)
    kl_only, _ = grpo_policy_loss(new, old, ref, adv, mask, 0.2, beta=0.5, token_weights=zero)
    kl_and_pg, _ = grpo_policy_loss(new, old, ref, adv, mask, 0.2, beta=0.5)
    no_kl, _ = grpo_policy_loss(new, old, ref, adv, mask, 0.2, beta=0.0)
    assert kl_only.item() == pytest.approx(kl_and_pg.item() - no_kl.item(), rel=1e-5, abs=1e-7)
