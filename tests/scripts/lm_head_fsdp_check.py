"""The chunked LM head under FSDP2 on several ranks, with tied and untied embeddings.

    torchrun --standalone --nproc_per_node 2 tests/scripts/lm_head_fsdp_check.py

For each of tied / untied: the same model (seeded) three times: an unsharded fp32 reference that
sees every rank's rows (full logits, float64 log-softmax), and two FSDP2-sharded copies, one through
tulu.lm_head.head_logprobs and one through the full logits. Each rank feeds its own rows; the loss is
the global token mean (apply_fsdp makes FSDP sum the ranks' gradients, so each rank scales by 1 / tokens).
After one backward and one SGD step (linear in the gradient, so no sign flips of near-zero entries) the gathered gradients and parameters of both sharded copies
must equal the reference's (fp32, relative 1e-5). Prints one JSON line and LM_HEAD_FSDP_OK.
"""
from __future__ import annotations

import copy
import json

import torch
from transformers import LlamaForCausalLM

from tulu.dist import init_dist, shutdown
from tulu.fsdp import apply_fsdp
from tulu.lm_head import head_logprobs, next_token_targets
from tulu.ops import logprobs_from_logits
from tulu.tiny import tiny_config

V, B, T = 120, 2, 11


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    d = init_dist()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (d.world * B, T), generator=g)  # (W*B, T) every rank's rows, same on all ranks
    ids[:, -3:][torch.rand(d.world * B, 3, generator=g) < 0.5] = -100  # some ignored labels
    inputs_all = ids.clamp(min=0)
    targets_all = next_token_targets(ids)  # (W*B, T), -100 where nothing is predicted
    total = int((targets_all >= 0).sum())
    mine = slice(d.rank * B, (d.rank + 1) * B)
    res = {"world": d.world}
    for tied in (False, True):
        torch.manual_seed(1)
        ref = LlamaForCausalLM(tiny_config(V, tie_word_embeddings=tied, num_hidden_layers=2))
        chunked, dense = copy.deepcopy(ref), copy.deepcopy(ref)
        for m in (chunked, dense):
            apply_fsdp(m, compute_dtype="fp32")
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in
                (("ref", ref), ("chunked", chunked), ("dense", dense))}

        # reference: every row, one process, float64 log-softmax of the full logits
        logits = ref(input_ids=inputs_all).logits.double()
        lp = logprobs_from_logits(logits, targets_all).masked_fill(targets_all < 0, 0)
        (-lp.sum() / total).backward()

        x, t = inputs_all[mine], targets_all[mine]
        lp_c, _ = head_logprobs(chunked, {"input_ids": x}, t, chunk=4)
        (-lp_c.sum() / total).backward()
        lp_d = logprobs_from_logits(dense(input_ids=x).logits, t).masked_fill(t < 0, 0)
        (-lp_d.sum() / total).backward()

        grads = {}
        for (name, p), (_, pc), (_, pd) in zip(ref.named_parameters(), chunked.named_parameters(),
                                              dense.named_parameters()):
            grads[name] = max(rel(full(pc.grad), p.grad), rel(full(pd.grad), p.grad))
        for o in opts.values():
            o.step()
        params = max(max(rel(full(pc.detach()), p.detach()), rel(full(pd.detach()), p.detach()))
                     for (_, p), (_, pc), (_, pd) in zip(ref.named_parameters(), chunked.named_parameters(),
                                                         dense.named_parameters()))
        names = [n for n, _ in chunked.named_parameters()]
        res["tied" if tied else "untied"] = {"max_grad_rel": max(grads.values()), "max_param_rel": params,
                                              "has_lm_head_param": "lm_head.weight" in names}
        assert max(grads.values()) < 1e-5 and params < 1e-5, (tied, grads)
        del ref, chunked, dense, opts
    assert res["tied"]["has_lm_head_param"] is False and res["untied"]["has_lm_head_param"] is True, res
    if d.is_main:
        print(json.dumps(res))
        print("LM_HEAD_FSDP_OK")
    shutdown()


if __name__ == "__main__":
    main()
