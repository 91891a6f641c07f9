"""An independent single-process SFT loop (plain HF model, no FSDP, no packing, one sequence at a
time) that computes each reduction's objective straight from its formula. Tests compare
train/sft.py's logged loss and gradient norm against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tulu.data import build_sft_data, epoch_permutation, step_samples
from tulu.model import load_tokenizer
from tulu.optim import lr_at
from tulu.tiny import tiny_dir


def switch_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4) over every layer's router
    logits (tokens, E): E · Σ_e f_e · P_e, with f_e the share of the top-k assignments routed to expert e
    and P_e the mean router probability of e, over all layers' real tokens (mask (tokens,): 1 = real)."""
    logits = torch.cat(router_logits)  # (layers · tokens, E)
    probs = logits.softmax(-1)
    E = probs.shape[-1]
    w = torch.ones(probs.shape[0]) if mask is None else mask.float().repeat(len(router_logits))  # (LN,)
    picked = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, -1).indices, 1.0)  # (LN, E) 0/1
    f = (picked * w[:, None]).sum(0) / w.sum()  # (E,)
    P = (probs * w[:, None]).sum(0) / w.sum()  # (E,)
    return E * (f * P).sum()


def reference_run(mixer: dict, reduce_loss: str, per_device: int, grad_accum: int, world: int, steps: int,
                  lr: float, max_seq_length: int, seed: int = 42, clip: float = 1.0, warmup_ratio: float = 0.0,
                  model_path=None, load_balancing_weight: float = 0.0):
    """[(loss, grad norm)] per step. load_balancing_weight: the micro-batches hold one sequence each
    (per_device 1, unpacked) and each adds weight · its switch_loss, under the original's 1/(GA·W)."""
    tok = load_tokenizer("tulu/tiny")
    data = build_sft_data(mixer, tok, max_seq_length)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path or tiny_dir(), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    G = per_device * grad_accum * world
    steps_per_epoch = -(-len(data) // G)
    warmup = int(steps * warmup_ratio)
    out = []
    for step in range(steps):
        epoch, k = divmod(step, steps_per_epoch)
        samples = step_samples(epoch_permutation(len(data), seed, epoch), k, G)
        ce, n, aux = [], [], []
        for row in data.rows(samples):
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            fwd = model(input_ids=ids, output_router_logits=bool(load_balancing_weight))
            logits = fwd.logits[0]  # (T, V)
            if load_balancing_weight:
                assert per_device == 1, "one sequence per micro-batch: the router loss is per micro-batch"
                aux.append(switch_loss(fwd.router_logits, model.config.num_experts_per_tok))
            ce.append(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            n.append((labels[1:] != -100).sum())
        ce, n = torch.stack(ce), torch.stack(n).float()  # (G,)
        if reduce_loss == "token_mean":
            loss = ce.sum() / n.sum()
        elif reduce_loss == "sum":
            loss = ce.sum() / (grad_accum * world)
        else:  # micro-batches of per_device consecutive samples; average of their token means
            mb = torch.stack([ce[i:i + per_device].sum() / n[i:i + per_device].sum().clamp(min=1) for i in range(0, G, per_device)])
            loss = mb.mean()
        if load_balancing_weight:
            loss = loss + load_balancing_weight * torch.stack(aux).sum() / (grad_accum * world)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step, steps, warmup, "linear")
        opt.step()
        opt.zero_grad()
        out.append((loss.item(), gn.item()))
    return out, model
