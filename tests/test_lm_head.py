"""Chunked LM-head log-probs (tulu/lm_head.py) against the unchunked computation: full logits, fp32
log-softmax, autograd. Values and gradients (hidden states and head weight) within fp32 1e-6 relative,
for ragged chunks, ignored targets, temperature != 1, entropy, and tied and untied heads in a model."""
import pytest
import torch

from tulu.lm_head import chunked_logprobs, head_logprobs
from tulu.ops import logprobs_from_logits
from tulu.tiny import tiny_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def reference(hidden, weight, targets, temperature, softcap=None):
    z = (hidden @ weight.t()).double()
    if softcap:  # Gemma 2's final-logit soft-capping, before the temperature
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(targets < 0, 0)
    return picked, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature,chunk,softcap", [(1.0, 7, None), (0.7, 64, None), (1.3, 1000, None),
                                                        (0.7, 7, 2.0), (1.0, 64, 30.0)])
def test_values_and_gradients_equal_the_full_logits(temperature, chunk, softcap):
    g = torch.Generator().manual_seed(0)
    N, H, V = 50, 16, 97
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * (0.5 if softcap is None else 2.0)).requires_grad_()  # caps bite
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100  # ignored positions
    w_lp, w_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)  # arbitrary upstream gradients

    lp, ent = chunked_logprobs(hidden, weight, targets, temperature, chunk, with_entropy=True, softcap=softcap)
    (lp * w_lp + ent * w_ent).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref_lp, ref_ent = reference(hidden, weight, targets, temperature, softcap)
    (ref_lp * w_lp.double() + (ref_ent * w_ent.double()).masked_fill(targets < 0, 0)).sum().backward()
    keep = targets >= 0
    assert (lp[~keep] == 0).all() and (ent[~keep] == 0).all()  # ignored positions: nothing computed
    assert rel(lp.double(), ref_lp) < 1e-6 and rel(ent[keep].double(), ref_ent[keep]) < 1e-6
    assert rel(got[0], hidden.grad) < 1e-6 and rel(got[1], weight.grad) < 1e-6


def test_without_entropy_and_batched_shapes():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(-1, 40, (3, 11), generator=g)
    lp, ent = chunked_logprobs(hidden, weight, targets, chunk=5)
    assert ent is None and lp.shape == (3, 11) and lp.dtype == torch.float32
    lp.sum().backward()
    ref = logprobs_from_logits(hidden.detach() @ weight.detach().t(), targets).masked_fill(targets < 0, 0)
    assert rel(lp.detach(), ref) < 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_inside_the_model_head_equals_its_logits(tied):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(100, tie_word_embeddings=tied, num_hidden_layers=2))
    ids = torch.randint(0, 100, (2, 13))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # next token; the last has none
    inputs = {"input_ids": ids}

    lp, _ = head_logprobs(model, inputs, targets, temperature=0.8, chunk=6)
    lp.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert type(model.lm_head).forward is model.lm_head.forward.__func__  # the head's forward is back

    ref = logprobs_from_logits(model(**inputs).logits, targets, 0.8).masked_fill(targets < 0, 0)
    ref.sum().backward()
    assert rel(lp.detach(), ref.detach()) < 1e-6
    for n, p in model.named_parameters():
        assert rel(got[n], p.grad) < 1e-5, n  # through 2 layers: fp32 sums in another order


@pytest.mark.parametrize("packed", [False, True])
def test_pair_logps_chunked_equals_full(packed):
    """DPO's per-sequence sums and means, from the chunked head and from the logits, padded and packed."""
    from transformers import LlamaForCausalLM

    from tulu.preference import collate_dpo_pairs, pair_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(100, num_hidden_layers=2))
    rows = []
    for n_prompt, n_c, n_r in ((3, 4, 2), (5, 1, 6), (2, 3, 3)):
        prompt = torch.randint(3, 100, (n_prompt,)).tolist()
        c, r = torch.randint(3, 100, (n_c,)).tolist(), torch.randint(3, 100, (n_r,)).tolist()
        rows.append({"chosen_input_ids": prompt + c, "chosen_labels": [-100] * n_prompt + c,
                     "rejected_input_ids": prompt + r, "rejected_labels": [-100] * n_prompt + r})
    batch = collate_dpo_pairs(rows, 0, packed)
    full = pair_logps(model, batch, torch.device("cpu"))
    chunked = pair_logps(model, batch, torch.device("cpu"), chunked=True)
    for k in full:
        assert rel(chunked[k].detach(), full[k].detach()) < 1e-6, k


def test_response_logprobs_chunked_equals_full():
    """RLVR's learner-side log-probs of left-padded prompts + right-padded responses, at a temperature."""
    from transformers import LlamaForCausalLM

    from tulu.rl_batch import response_logprobs, rollout_batch

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(100, num_hidden_layers=2))
    queries = [torch.randint(3, 100, (n,)).tolist() for n in (4, 7, 2)]
    responses = [torch.randint(3, 100, (n,)).tolist() for n in (5, 1, 8)]
    batch = rollout_batch(queries, responses, pad_id=0, response_length=6)
    cpu = torch.device("cpu")
    full = response_logprobs(model, batch, slice(None), cpu, 0.7)
    chunked = response_logprobs(model, batch, slice(None), cpu, 0.7, chunked=True)
    mask = batch["response_mask"]
    assert torch.equal(full[~mask], chunked[~mask])  # INVALID_LOGPROB on padding, both
    assert rel(chunked[mask].detach(), full[mask].detach()) < 1e-6


@pytest.mark.slow
def test_two_fsdp_ranks_tied_and_untied_equal_one_process():
    """Under FSDP2 on 2 ranks, each with its own rows: the chunked head's and the full logits' gathered
    gradients and updated parameters equal an unsharded float64-loss reference over all rows (1e-5
    relative; measured ~2e-7), with the head tied to the embedding and not."""
    import json

    from conftest import torchrun

    proc = torchrun("tests/scripts/lm_head_fsdp_check.py", [], nproc=2, timeout=300)
    assert "LM_HEAD_FSDP_OK" in proc.stdout, proc.stdout[-2000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert res["tied"]["max_grad_rel"] < 1e-5 and res["untied"]["max_grad_rel"] < 1e-5, res
