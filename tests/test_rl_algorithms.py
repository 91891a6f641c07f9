"""The RL algorithm table (tulu/rl_algorithms.py): each variant's loss against its paper's formula,
written out one response and one token at a time on random inputs."""
from __future__ import annotations

import math

import pytest
import torch

from tulu.advantages import grpo_advantages
from tulu.rl_algorithms import (ALGORITHMS, LossConfig, dapo_loss, dr_grpo_loss, gspo_loss, informative_groups,
                                overlong_penalty)


def random_batch(seed=0, B=8, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2
    new = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)
    return new, old, ref, adv, mask


def token_surrogate(new, old, a, lo, hi):
    r = math.exp(new - old)
    return max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))


def kl3(new, ref):
    x = max(-40.0, min(40.0, new - ref))
    return math.expm1(-x) + x


def test_dr_grpo_sums_tokens_over_a_constant():
    new, old, ref, adv, mask = random_batch(1)
    cfg = LossConfig(0.2, 0.2, beta=0.1, kl_estimator="kl3", response_length=7)
    loss, _ = dr_grpo_loss(new, old, ref, adv, mask, cfg)
    B, T = old.shape
    want = sum(token_surrogate(new[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.2)
               + 0.1 * kl3(new[b, t].item(), ref[b, t].item())
               for b in range(B) for t in range(T) if mask[b, t]) / (B * 7)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # Its advantages: mean-centred within the group, not divided by the std.
    s = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    assert grpo_advantages(s, 3, scale_by_std=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -4 / 3, 5 / 3, -1 / 3])


def test_dapo_clips_higher_and_averages_over_the_global_tokens():
    new, old, ref, adv, mask = random_batch(2)
    global_tokens = 3.0 * mask.sum().item()  # e.g. the mini-batch spans 3 such micro-batches
    cfg = LossConfig(0.2, 0.28, beta=0.0, kl_estimator="kl3")
    loss, _ = dapo_loss(new, old, ref, adv, mask, cfg)
    loss = loss / global_tokens  # a token sum: the script weighs it by 1 / the mini-batch's tokens on all ranks
    B, T = old.shape
    want = sum(token_surrogate(new[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.28)
               for b in range(B) for t in range(T) if mask[b, t]) / global_tokens
    assert loss.item() == pytest.approx(want, rel=1e-5)
    sym, _ = dapo_loss(new, old, ref, adv, mask, LossConfig(0.2, 0.2, 0.0, "kl3"))
    sym = sym / global_tokens
    assert sym.item() != pytest.approx(loss.item())  # the higher clip matters on these ratios


def test_dapo_overlong_shaping_and_dynamic_sampling():
    lengths = torch.tensor([10, 16, 17, 18, 19, 20])
    # max 20 tokens, the last 4 a buffer: 0 up to 16, then linear to −1 at 20 (eq. 13)
    assert overlong_penalty(lengths, 20, 4).tolist() == pytest.approx([0, 0, -0.25, -0.5, -0.75, -1.0])
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 6
    scores = torch.tensor([10.0, 10.0, 10.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])  # groups of 3
    assert informative_groups(scores, 3).tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_gspo_clips_the_sequence_ratio():
    new, old, ref, adv, mask = random_batch(3)
    cfg = LossConfig(3e-4, 4e-4, beta=0.0, kl_estimator="kl3")
    loss, metrics = gspo_loss(new, old, ref, adv, mask, cfg)
    B, T = old.shape
    per_seq = []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        s = math.exp(sum(new[b, t].item() - old[b, t].item() for t in toks) / len(toks))  # (π/π_old)^(1/|y|)
        a = adv[b].item()
        per_seq.append(max(-a * s, -a * min(max(s, 1 - 3e-4), 1 + 4e-4)))
    assert loss.item() == pytest.approx(sum(per_seq) / B, rel=1e-5)
    assert 0 < metrics["policy/clipfrac_avg"].item() <= 1  # these random ratios leave the tiny band
    loss.backward()  # the gradient flows through the sequence ratio
    assert torch.isfinite(new.grad).all() and new.grad[~mask].abs().max() == 0


def test_table_rows():
    assert [k for k, a in ALGORITHMS.items() if a.value_model] == ["ppo"]
    assert [k for k, a in ALGORITHMS.items() if a.kl_in_reward] == ["ppo"]
    assert ALGORITHMS["dr_grpo"].advantages == "group_mean" and ALGORITHMS["dapo"].clip == (0.2, 0.28)
    assert ALGORITHMS["gspo"].clip == (3e-4, 4e-4)  # the GSPO paper's ranges
