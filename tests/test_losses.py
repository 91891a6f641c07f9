"""Losses vs hand-written references (naive loops / other formulations) and limit cases. CPU, float64."""
import inspect
import math

import pytest
import torch

from tulu.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, simpo_loss, wpo_loss
from tulu.ops import segment_sums, sequence_logps
from tulu.rl_losses import (
    grpo_policy_loss,
    kl_penalty,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    rlvr_scores,
)

D = torch.float64
TOL = dict(rtol=0, atol=1e-6)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _logsig(x):  # the textbook form, independent of F.logsigmoid
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _pair_ref(pc, pr, rc, rr, beta, eps, weights=None):
    total = 0.0
    for i in range(len(pc)):
        z = (pc[i] - rc[i]) - (pr[i] - rr[i])  # chosen log-ratio minus rejected log-ratio
        li = -(1 - eps) * _logsig(beta * z) - eps * _logsig(-beta * z)
        total += li * (1.0 if weights is None else weights[i])
    return total / len(pc)


def _rand(n, seed, scale=3.0):
    return torch.randn(n, generator=_g(seed), dtype=D) * scale


# ------------------------------------------------------------------------------ sequence logps


def test_sequence_logps_sum_mean_and_empty_row():
    lp = torch.randn(3, 5, generator=_g(0), dtype=D)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    lp[0, 3] = float("-inf")  # a masked -inf must not poison the row
    s, a = sequence_logps(lp, mask, average=False), sequence_logps(lp, mask, average=True)
    for b in range(3):
        vals = [lp[b, t].item() for t in range(5) if mask[b, t]]
        assert s[b].item() == pytest.approx(sum(vals), abs=1e-12)
        assert a[b].item() == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-12)
    assert torch.isfinite(a).all()


def test_segment_sums_packed_equal_per_sequence():
    lens = [3, 5, 2]
    seqs = [torch.randn(n, generator=_g(i), dtype=D) for i, n in enumerate(lens)]
    masks = [torch.rand(n, generator=_g(10 + i)) > 0.3 for i, n in enumerate(lens)]
    packed = torch.cat(seqs + [torch.zeros(2, dtype=D)])[None, :]  # (1, T) with 2 trailing pad tokens
    pmask = torch.cat(masks + [torch.zeros(2, dtype=torch.bool)])[None, :]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((2,), -1)])
    got_sum = sequence_logps(packed, pmask, False, segment_ids=ids, num_segments=3)
    got_avg = sequence_logps(packed, pmask, True, segment_ids=ids, num_segments=3)
    for i in range(3):
        assert got_sum[i].item() == pytest.approx(seqs[i][masks[i]].sum().item(), abs=1e-12)
        assert got_avg[i].item() == pytest.approx(seqs[i][masks[i]].mean().item() if masks[i].any() else 0.0, abs=1e-12)
    x = torch.randn(7, dtype=D, requires_grad=True)
    segment_sums(x, torch.tensor([0, 0, 1, -1, 1, 2, 2]), 3).sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 0, 1, 1, 1]  # dropped token gets no gradient


# -------------------------------------------------------------------------------- DPO family


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_matches_reference(eps):
    pc, pr, rc, rr = (_rand(6, s) for s in range(4))
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=eps)
    loss, m = loss / 6, {k: v / 6 for k, v in m.items()}  # sums over the 6 pairs -> per-pair means
    assert loss.item() == pytest.approx(_pair_ref(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.7, eps), abs=1e-9)
    cr, rj = 0.7 * (pc - rc), 0.7 * (pr - rr)
    acc = sum(float(cr[i] > rj[i]) for i in range(6)) / 6
    assert m["rewards/accuracy"].item() == pytest.approx(acc)
    assert m["rewards/margin"].item() == pytest.approx((cr - rj).mean().item())
    assert m["rewards/chosen"].item() == pytest.approx(cr.mean().item())
    assert m["logps/rejected"].item() == pytest.approx(pr.mean().item())
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dpo_accuracy_is_per_pair_not_batch_mean():
    # pair 0 huge positive margin, pairs 1-2 small negative: batch means say 1.0, per pair says 1/3
    pc, pr = torch.tensor([10.0, 0.0, 0.0], dtype=D), torch.tensor([0.0, 0.1, 0.1], dtype=D)
    z = torch.zeros(3, dtype=D)
    _, m = dpo_loss(pc, pr, z, z, beta=1.0)
    assert m["rewards/accuracy"].item() / 3 == pytest.approx(1 / 3)


def test_dpo_equal_logratios_give_log2_and_small_beta():
    pc, pr = _rand(4, 1), _rand(4, 2)
    loss, _ = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=5.0)  # z = 0
    assert loss.item() / 4 == pytest.approx(math.log(2), abs=1e-12)
    rc, rr = _rand(4, 3), _rand(4, 4)
    grads = []
    for beta in (1e-4, 2e-4):
        x = pc.clone().requires_grad_(True)
        loss, _ = dpo_loss(x, pr, rc, rr, beta=beta)
        loss = loss / 4  # the sum over 4 pairs -> their mean
        assert loss.item() == pytest.approx(math.log(2), abs=1e-3)  # β→0: loss → log 2
        loss.backward()
        grads.append(x.grad.clone())
    z = (pc - pr) - (rc - rr)
    assert torch.allclose(grads[0], -1e-4 * torch.sigmoid(-1e-4 * z) / 4, **TOL)
    assert torch.allclose(grads[1], 2 * grads[0], rtol=1e-3, atol=0)  # gradient ∝ β as β→0


def test_label_smoothing_half_is_symmetric():
    pc, pr, rc, rr = (_rand(5, s) for s in range(4))
    a, _ = dpo_loss(pc, pr, rc, rr, 1.0, 0.5)
    b, _ = dpo_loss(pr, pc, rr, rc, 1.0, 0.5)  # swap chosen/rejected: ε=½ does not care
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_simpo_matches_reference_and_has_no_reference_args():
    params = list(inspect.signature(simpo_loss).parameters)
    assert not any("ref" in p for p in params)
    pc, pr = _rand(6, 5, 1.0), _rand(6, 6, 1.0)
    loss, m = simpo_loss(pc, pr, beta=2.0, gamma_beta_ratio=0.3, label_smoothing=0.1)
    loss, m = loss / 6, {k: v / 6 for k, v in m.items()}  # sums over the 6 pairs -> per-pair means
    ref = sum(-(0.9) * _logsig(2.0 * (c - r - 0.3)) - 0.1 * _logsig(-2.0 * (c - r - 0.3)) for c, r in zip(pc.tolist(), pr.tolist())) / 6
    assert loss.item() == pytest.approx(ref, abs=1e-9)
    assert m["rewards/chosen"].item() == pytest.approx(2.0 * pc.mean().item())


def test_wpo_weight_detached_clamped_and_matches_reference():
    pc, pr, rc, rr = (_rand(5, s) for s in range(4))
    pca, pra = _rand(5, 7, 0.5), _rand(5, 8, 0.5)
    pca[0], pra[0] = 2.0, 1.0  # exp(3) > 1: clamped to 1
    x_avg = pca.clone().requires_grad_(True)
    loss, m = wpo_loss(pc, pr, rc, rr, x_avg, pra, beta=0.5, label_smoothing=0.05)
    loss, m = loss / 5, {k: v / 5 for k, v in m.items()}  # sums over the 5 pairs -> per-pair means
    w = [min(1.0, math.exp(a + b)) for a, b in zip(pca.tolist(), pra.tolist())]
    assert w[0] == 1.0
    ref = _pair_ref(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.5, 0.05, w)
    assert loss.item() == pytest.approx(ref, abs=1e-9)
    assert m["wpo/weight"].item() == pytest.approx(sum(w) / 5)
    y = pc.clone().requires_grad_(True)
    loss, _ = wpo_loss(y, pr, rc, rr, x_avg, pra, beta=0.5)
    gx, gy = torch.autograd.grad(loss, [x_avg, y], allow_unused=True)
    assert gx is None or torch.all(gx == 0)  # no gradient through the weight
    assert gy.abs().sum() > 0


def test_dpo_dispatch_table():
    pc, pr, rc, rr = (_rand(4, s) for s in range(4))
    assert {k: (v.average_log_prob, v.needs_reference) for k, v in DPO_LOSSES.items()} == {
        "dpo": (False, True), "dpo_norm": (True, True), "simpo": (True, False), "wpo": (False, True)}
    kw = dict(beta=0.3, label_smoothing=0.0, gamma_beta_ratio=0.5, policy_chosen_avg=pc / 10, policy_rejected_avg=pr / 10)
    assert DPO_LOSSES["dpo_norm"].fn(pc, pr, rc, rr, **kw)[0].item() == dpo_loss(pc, pr, rc, rr, 0.3)[0].item()
    assert DPO_LOSSES["simpo"].fn(pc, pr, None, None, **kw)[0].item() == simpo_loss(pc, pr, 0.3, 0.5)[0].item()
    assert DPO_LOSSES["wpo"].fn(pc, pr, rc, rr, **kw)[0].item() == wpo_loss(pc, pr, rc, rr, pc / 10, pr / 10, 0.3)[0].item()


# ------------------------------------------------------------------------------ reward model


def test_bradley_terry_matches_reference():
    c, r = _rand(8, 1), _rand(8, 2)
    r[3] = c[3]  # a tie counts as wrong
    loss, m = bradley_terry_loss(c, r)
    loss, m = loss / 8, {k: v / 8 for k, v in m.items()}  # sums over the 8 pairs -> per-pair means
    assert loss.item() == pytest.approx(sum(-_logsig(a - b) for a, b in zip(c.tolist(), r.tolist())) / 8, abs=1e-9)
    assert m["accuracy"].item() == pytest.approx(sum(a > b for a, b in zip(c.tolist(), r.tolist())) / 8)
    assert m["chosen_rewards"].item() == pytest.approx(c.mean().item())
    assert m["rejected_rewards"].item() == pytest.approx(r.mean().item())
    assert m["margin"].item() == pytest.approx((c - r).mean().item())


# ------------------------------------------------------------------------------ KL and rewards


def test_kl_estimators():
    lp, ref = torch.randn(3, 4, generator=_g(1), dtype=D), torch.randn(3, 4, generator=_g(2), dtype=D)
    k1, k2, k3 = (kl_penalty(lp, ref, e) for e in ("kl1", "kl2", "kl3"))
    for b in range(3):
        for t in range(4):
            d = lp[b, t].item() - ref[b, t].item()
            assert k1[b, t].item() == pytest.approx(d, abs=1e-12)
            assert k2[b, t].item() == pytest.approx(0.5 * d * d, abs=1e-12)
            assert k3[b, t].item() == pytest.approx(math.exp(-d) - 1 + d, abs=1e-12)
    assert (k3 >= 0).all()
    tiny = kl_penalty(torch.tensor([1e-9], dtype=torch.float32), torch.zeros(1), "kl3")
    assert tiny.item() == pytest.approx(0.5e-18, rel=1e-3)  # expm1: no cancellation to 0 or negatives
    big = kl_penalty(torch.tensor([-100.0]), torch.zeros(1), "kl3", log_ratio_clamp=40.0)
    assert torch.isfinite(big).all() and big.item() == pytest.approx(math.exp(40) - 41, rel=1e-5)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "kl4")


def test_ppo_rewards_score_position_and_non_score():
    kl = torch.randn(3, 6, generator=_g(3), dtype=D)
    scores = torch.tensor([10.0, 0.0, -10.0], dtype=D)
    seq_lens = torch.tensor([2, 5, 4])  # row 1: no stop (last token), row 2: EOS at T-2
    rewards, nsr = ppo_rewards(kl, scores, seq_lens, beta=0.05)
    for b in range(3):
        s = seq_lens[b].item()
        ref = [(-0.05 * kl[b, t].item() if t <= s else 0.0) for t in range(6)]
        ref[s + 1 if s + 1 < 6 else s] += scores[b].item()
        assert rewards[b].tolist() == pytest.approx(ref, abs=1e-12)
        assert nsr[b].item() == pytest.approx(sum(-0.05 * kl[b, t].item() for t in range(s + 1)), abs=1e-12)


def test_rlvr_scores_and_non_stop_penalty():
    stop, pad = 7, 0
    responses = torch.tensor([[3, 7, pad, pad], [3, 4, 5, 6], [7, pad, pad, pad], [3, 4, 7, pad]])
    seq_lens = torch.tensor([1, 3, 0, 2])
    verified = torch.tensor([True, True, False, True])
    rm = torch.tensor([0.5, 0.5, 0.5, 0.5])
    s = rlvr_scores(rm, verified, responses, seq_lens, stop, reward_model_multiplier=0.0)
    assert s.tolist() == [10.0, 10.0, 0.0, 10.0]  # no penalty unless asked
    s = rlvr_scores(rm, verified, responses, seq_lens, stop, 2.0, 10.0, non_stop_penalty=True, penalty_reward_value=-10.0)
    assert s.tolist() == [11.0, -10.0, 1.0, 11.0]  # row 1 never stops
    s = rlvr_scores(None, verified, responses, seq_lens, stop, 0.0, 10.0, True, -10.0, min_response_length=2)
    assert s.tolist() == [-10.0, -10.0, -10.0, 10.0]  # rows 0, 2 stop but seq_len < 2: penalized too


# -------------------------------------------------------------------------------- PPO / GRPO


def _ppo_ref(new, old, adv, mask, c):
    num = den = clip = akl = 0.0
    for b in range(len(new)):
        for t in range(len(new[0])):
            if mask[b][t]:
                d = new[b][t] - old[b][t]
                ratio = math.exp(d)
                l1, l2 = -adv[b][t] * ratio, -adv[b][t] * min(max(ratio, 1 - c), 1 + c)
                num, den, clip = num + max(l1, l2), den + 1, clip + (l2 > l1)
                akl += 0.5 * d * d
    return num, den, clip / den, akl / den


def _rl_batch(seed, B=3, T=7):
    new = torch.randn(B, T, generator=_g(seed), dtype=D) * 0.3
    old = new + torch.randn(B, T, generator=_g(seed + 1), dtype=D) * 0.3
    adv = torch.randn(B, T, generator=_g(seed + 2), dtype=D)
    mask = torch.arange(T)[None, :] <= torch.tensor([2, 6, 4])[:, None]
    return new, old, adv, mask


def test_ppo_policy_loss_matches_loop_and_normalizers():
    new, old, adv, mask = _rl_batch(0)
    num, den, clipfrac, akl = _ppo_ref(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    loss, m = ppo_policy_loss(new, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(num / den, abs=1e-9)
    assert m["policy/clipfrac_avg"].item() == pytest.approx(clipfrac) and 0 < clipfrac < 1
    assert m["policy/approxkl_avg"].item() == pytest.approx(akl, abs=1e-9)
    loss_g, _ = ppo_policy_loss(new, old, adv, mask, 0.2, loss_normalizer=100.0)
    assert loss_g.item() == pytest.approx(num / 100.0, abs=1e-9)


def test_ppo_ratio_one_equals_plain_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=D, requires_grad=True)
    actions = torch.randint(0, 11, (2, 5))
    adv = torch.randn(2, 5, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)  # (B, T)
    loss, m = ppo_policy_loss(logp, logp.detach(), adv, mask, 0.2)
    (g_ppo,) = torch.autograd.grad(loss, logits, retain_graph=True)
    plain = -(adv * logp * mask).sum() / mask.sum()  # REINFORCE: −A·∇logp, token mean
    (g_pg,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(g_ppo, g_pg, rtol=0, atol=1e-12)
    assert m["val/ratio"].item() == 1.0 and m["policy/clipfrac_avg"].item() == 0.0


def test_ppo_value_loss_matches_loop():
    v, old, R, mask = _rl_batch(10)
    loss, m = ppo_value_loss(v, old, R, mask, 0.2)
    num = den = clip = 0.0
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                vb, ob, rb = v[b, t].item(), old[b, t].item(), R[b, t].item()
                vc = min(max(vb, ob - 0.2), ob + 0.2)
                l1, l2 = (vb - rb) ** 2, (vc - rb) ** 2
                num, den, clip = num + 0.5 * max(l1, l2), den + 1, clip + (l2 > l1)
    assert loss.item() == pytest.approx(num / den, abs=1e-9)
    assert m["val/clipfrac_avg"].item() == pytest.approx(clip / den) and 0 < clip < den
    assert ppo_value_loss(v, old, R, mask, 0.2, loss_normalizer=50)[0].item() == pytest.approx(num / 50, abs=1e-9)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_grpo_policy_loss_matches_loop(normalization):
    new, old, _, mask = _rl_batch(20)
    ref = new + torch.randn(3, 7, generator=_g(99), dtype=D) * 0.5
    adv = torch.randn(3, generator=_g(98), dtype=D)
    x = new.clone().requires_grad_(True)
    loss, m = grpo_policy_loss(x, old, ref, adv, mask, 0.2, beta=0.05, normalization=normalization)
    per_seq, tot, cnt = [], 0.0, 0
    for b in range(3):
        vals = []
        for t in range(7):
            if mask[b, t]:
                ratio = math.exp(new[b, t].item() - old[b, t].item())
                a = adv[b].item()
                pg = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
                d = new[b, t].item() - ref[b, t].item()
                vals.append(pg + 0.05 * (math.exp(-d) - 1 + d))
        per_seq.append(sum(vals) / len(vals))
        tot, cnt = tot + sum(vals), cnt + len(vals)
    expect = tot / cnt if normalization == "token" else sum(per_seq) / 3
    assert loss.item() == pytest.approx(expect, abs=1e-9)
    loss.backward()  # the KL term is differentiable through new_logprobs
    assert x.grad[~mask].abs().sum() == 0 and x.grad[mask].abs().sum() > 0
    assert "objective/kl" in m


def test_grpo_kl_gradient_beta_only():
    # advantages 0 and ratio 1: the only gradient is β·∂kl3/∂lp = β(1 − exp(−(lp − ref))) / N
    new, _, _, mask = _rl_batch(30)
    ref = new + 0.3
    x = new.clone().requires_grad_(True)
    loss, _ = grpo_policy_loss(x, new, ref, torch.zeros(3, dtype=D), mask, 0.2, beta=0.1)
    loss.backward()
    expect = 0.1 * (1 - torch.exp(torch.tensor(0.3, dtype=D))) * mask / mask.sum()
    assert torch.allclose(x.grad, expect, **TOL)


def test_policy_losses_ignore_garbage_in_padding():
    new, old, adv, mask = _rl_batch(40)
    dirty = torch.where(mask, new, 1e4)  # exp(1e4 − old) would be inf·0 = NaN in a plain masked sum
    for fn in (lambda x: ppo_policy_loss(x, old, adv, mask, 0.2), lambda x: grpo_policy_loss(x, old, new, adv[:, 0], mask, 0.2, 0.05)):
        clean, _ = fn(new)
        got, m = fn(dirty)
        assert torch.isfinite(got) and got.item() == pytest.approx(clean.item(), abs=1e-12)
        assert all(torch.isfinite(v) for v in m.values())
