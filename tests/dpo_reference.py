"""An independent single-process DPO loop: plain HF policy and reference models (no FSDP, no packing,
no cache), every sequence through its own forward, log-probs from a full log_softmax, the loss of the
whole global batch at once (mean over its G pairs). Tests compare train/dpo.py's logged loss and
gradient norm against it."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from tulu.data import epoch_permutation, step_samples
from tulu.losses import dpo_loss, simpo_loss, wpo_loss
from tulu.model import load_tokenizer, resolve
from tulu.optim import lr_at
from tulu.preference import build_preference_data


def sequence_logp(model, input_ids: list[int], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, token-averaged) log-prob of the trained tokens of one sequence, its own forward."""
    ids, labels = torch.tensor([input_ids]), torch.tensor(labels)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T-1, V)
    mask = labels[1:] != -100  # (T-1,)
    picked = logp[mask].gather(-1, labels[1:][mask, None]).squeeze(-1)  # (n,)
    return picked.sum(), picked.mean()


def reference_run(mixer: dict, loss_type: str, per_device: int, grad_accum: int, world: int, steps: int, lr: float,
                  max_seq_length: int, beta: float, model: str = "tulu/tiny", seed: int = 42, clip: float = 1.0,
                  gamma_beta_ratio: float = 0.3, label_smoothing: float = 0.0) -> list[tuple[float, float]]:
    tok = load_tokenizer(model)
    data = build_preference_data(mixer, tok, max_seq_length)
    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=torch.float32, attn_implementation="sdpa")
    ref = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=torch.float32, attn_implementation="sdpa").eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    G = per_device * grad_accum * world
    steps_per_epoch = -(-len(data) // G)
    out = []
    for step in range(steps):
        epoch, k = divmod(step, steps_per_epoch)
        rows = data.rows(step_samples(epoch_permutation(len(data), seed, epoch), k, G))
        pol = {s: [sequence_logp(policy, r[f"{s}_input_ids"], r[f"{s}_labels"]) for r in rows] for s in ("chosen", "rejected")}
        with torch.no_grad():
            rf = {s: [sequence_logp(ref, r[f"{s}_input_ids"], r[f"{s}_labels"]) for r in rows] for s in ("chosen", "rejected")}
        ps, pa = ({s: torch.stack([x[j] for x in pol[s]]) for s in pol} for j in (0, 1))  # summed, averaged (G,)
        rs, ra = ({s: torch.stack([x[j] for x in rf[s]]) for s in rf} for j in (0, 1))
        if loss_type == "dpo":
            loss, _ = dpo_loss(ps["chosen"], ps["rejected"], rs["chosen"], rs["rejected"], beta, label_smoothing)
        elif loss_type == "dpo_norm":
            loss, _ = dpo_loss(pa["chosen"], pa["rejected"], ra["chosen"], ra["rejected"], beta, label_smoothing)
        elif loss_type == "simpo":
            loss, _ = simpo_loss(pa["chosen"], pa["rejected"], beta, gamma_beta_ratio, label_smoothing)
        else:
            loss, _ = wpo_loss(ps["chosen"], ps["rejected"], rs["chosen"], rs["rejected"], pa["chosen"], pa["rejected"],
                               beta, label_smoothing)
        loss = loss / G  # the losses sum over pairs: the step's objective is their mean
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip if clip > 0 else float("inf"))
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step, steps, 0, "linear")
        opt.step()
        opt.zero_grad()
        out.append((loss.item(), gn.item()))
    return out
