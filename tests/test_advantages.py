"""GAE, whitening and GRPO advantages vs hand-written per-element references. CPU, float64."""
import math

import numpy as np
import pytest
import torch

from tulu.advantages import gae, grpo_advantages, whiten_advantages, whiten_global

D = torch.float64


def _gae_ref(rewards, values, valid, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        r = [rewards[b][t] if valid[b][t] else 0.0 for t in range(T)]
        v = [values[b][t] if valid[b][t] else 0.0 for t in range(T)]
        running = 0.0
        for t in range(T - 1, -1, -1):
            nv = v[t + 1] if t + 1 < T else 0.0
            running = r[t] + gamma * nv - v[t] + gamma * lam * running
            adv[b][t] = running
    rets = [[adv[b][t] + (values[b][t] if valid[b][t] else 0.0) for t in range(T)] for b in range(B)]
    return adv, rets


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 9, generator=g, dtype=D), torch.randn(4, 9, generator=g, dtype=D)
    valid = torch.arange(9)[None, :] <= torch.tensor([3, 8, 0, 6])[:, None]
    adv, ret = gae(rewards, values, valid, gamma, lam)
    ref_adv, ref_ret = _gae_ref(rewards.tolist(), values.tolist(), valid.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=D), rtol=0, atol=1e-6)
    assert torch.allclose(ret, torch.tensor(ref_ret, dtype=D), rtol=0, atol=1e-6)
    assert (adv[~valid] == 0).all()  # nothing leaks past the valid region


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, -0.1, 0.2, 10.0]], dtype=D)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    adv, ret = gae(rewards, values, torch.ones(1, 4, dtype=torch.bool), 1.0, 1.0)
    togo = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, togo) and torch.allclose(adv, togo - values)


def test_whiten_advantages():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, generator=g, dtype=D) * 4 + 2
    mask = torch.arange(6)[None, :] <= torch.tensor([1, 5, 3])[:, None]
    w = whiten_advantages(a, mask)
    vals = a[mask].tolist()
    n, mean = len(vals), sum(vals) / len(vals)
    var = sum((x - mean) ** 2 for x in vals) / (n - 1)  # unbiased
    expect = [(x - mean) / math.sqrt(var + 1e-8) for x in vals]
    assert w[mask].tolist() == pytest.approx(expect, abs=1e-9)
    assert (w[~mask] == 0).all()
    w2 = whiten_advantages(a, mask, shift_mean=False)
    assert w2[mask].tolist() == pytest.approx([x + mean for x in expect], abs=1e-9)


@pytest.mark.parametrize("unbiased", [True, False])
def test_grpo_advantages_matches_reference(unbiased):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(12, generator=g, dtype=D)
    adv = grpo_advantages(scores, 4, unbiased=unbiased)
    for k in range(3):
        grp = scores[4 * k : 4 * k + 4].tolist()
        mean = sum(grp) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (3 if unbiased else 4))
        assert adv[4 * k : 4 * k + 4].tolist() == pytest.approx([(x - mean) / (std + 1e-8) for x in grp], abs=1e-9)
    centered = grpo_advantages(scores, 4, scale_by_std=False)
    assert torch.allclose(centered, scores - scores.view(3, 4).mean(1).repeat_interleave(4))


def test_grpo_identical_rewards_give_exactly_zero():
    scores = torch.tensor([0.1, 0.1, 0.1, 10.0, 0.0, 10.0, -10.0, -10.0, -10.0])  # 0.1·3/3 ≠ 0.1 in fp
    adv = grpo_advantages(scores, 3)
    assert (adv[:3] == 0).all() and (adv[6:] == 0).all()
    assert adv[3:6].tolist() == pytest.approx([1 / math.sqrt(3), -2 / math.sqrt(3), 1 / math.sqrt(3)], abs=1e-6)
    assert (grpo_advantages(torch.tensor([1.0, 2.0]), 1) == 0).all()  # group of one: 0, not NaN


def _whiten_ref(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Independent float64 reference: the original's masked_whiten (two-pass, unbiased var, +1e-8), 0 on padding."""
    vals = a[mask].astype(np.float64)
    mean = vals.mean()
    var = ((vals - mean) ** 2).sum() / (len(vals) - 1)
    return np.where(mask, (a.astype(np.float64) - mean) / np.sqrt(var + 1e-8), 0.0)


def test_whiten_global_equals_local_whitening_on_one_rank():
    torch.manual_seed(3)
    a = torch.randn(6, 9, dtype=torch.float64) * 3 + 1
    mask = torch.rand(6, 9) > 0.3
    w = whiten_global(a, mask)
    assert torch.allclose(w, whiten_advantages(a, mask), rtol=0, atol=1e-12)
    assert np.allclose(w.numpy(), _whiten_ref(a.numpy(), mask.numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mean, std", [(1e4, 1e-2), (-3e3, 1e-3), (50.0, 1e-4)])
def test_whiten_global_large_mean_tiny_std_matches_float64(mean, std):
    """|mean| >> std in fp32 (what PPO advantages are): E[x²] − mean² in fp32 loses every digit of
    the variance here (or goes negative: NaN); the two-pass float64 sums do not."""
    g = torch.Generator().manual_seed(4)
    a = (mean + std * torch.randn(16, 32, generator=g, dtype=torch.float64)).float()  # (B, T) fp32
    mask = torch.arange(32)[None, :] <= torch.randint(0, 32, (16,), generator=g)[:, None]
    w = whiten_global(a, mask)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    ref = _whiten_ref(a.numpy(), mask.numpy())  # from the same fp32 values, in float64
    assert np.abs(w.double().numpy() - ref).max() < 1e-4, np.abs(w.double().numpy() - ref).max()


def _two_rank_worker(rank: int, port: int, a: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    from tulu.dist import all_reduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = slice(0, 5) if rank == 0 else slice(5, None)  # unequal halves, different token counts
        torch.save(whiten_global(a[rows], mask[rows], all_reduce), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_whiten_global_two_gloo_ranks_equal_the_whole_batch(tmp_path):
    """Two real processes, each with part of the batch: every rank whitens with the GLOBAL mean and
    variance (two all-reduces), equal to one float64 whitening of the whole batch."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    a = (200.0 + 0.5 * torch.randn(12, 10, generator=g, dtype=torch.float64)).float()
    a[5:] += 1.0  # the halves have different means: a rank-local whitening would differ
    mask = torch.rand(12, 10, generator=g) > 0.25
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, a, mask, str(tmp_path)), nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")])
    ref = _whiten_ref(a.numpy(), mask.numpy())
    assert np.abs(got.double().numpy() - ref).max() < 1e-5
    local = whiten_global(a[:5], mask[:5])  # what rank 0 alone would compute
    assert (local - got[:5]).abs().max() > 0.1
