"""An independent single-process reward-model loop: a plain HF `*ForSequenceClassification` (no
FSDP, no packing, no padding), every sequence scored alone through HF's own pooling, the
Bradley–Terry objective written out. Tests compare train/rm.py's logged loss, accuracy and gradient
norm against it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from tulu.data import epoch_permutation, step_samples
from tulu.model import load_tokenizer
from tulu.optim import lr_at
from tulu.reward import build_pref_data
from tulu.tiny import tiny_dir


def pair_scores(model, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, each sequence alone (batch 1, no pad: HF pools at the last token)."""
    return tuple(model(input_ids=torch.tensor([row[k]])).logits[0, 0]
                 for k in ("chosen_input_ids", "rejected_input_ids"))


def reference_run(mixer: dict, global_batch: int, steps: int, lr: float, seed: int = 1, eps: float = 1e-5,
                  weight_decay: float = 0.01, clip: float = 1.0, max_token_length: int = 256,
                  max_prompt_token_length: int = 128) -> list[tuple[float, float, float]]:
    """[(loss, accuracy, pre-clip grad norm)] per optimizer step."""
    tok = load_tokenizer("tulu/tiny")
    data = build_pref_data(mixer, ["train"], tok, max_token_length, max_prompt_token_length)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir(), num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id
    hidden = model.config.hidden_size
    with torch.no_grad():  # the intended open-instruct head init, N(0, 1/(hidden+1)), from the seed
        model.score.weight.copy_(torch.randn((1, hidden), generator=torch.Generator().manual_seed(seed)) / math.sqrt(hidden + 1))
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=eps)
    steps_per_epoch = -(-len(data) // global_batch)
    out = []
    for step in range(steps):
        epoch, k = divmod(step, steps_per_epoch)
        rows = data.rows(step_samples(epoch_permutation(len(data), seed, epoch), k, global_batch))
        chosen, rejected = (torch.stack(s) for s in zip(*(pair_scores(model, row) for row in rows)))  # (G,), (G,)
        loss = -F.logsigmoid(chosen - rejected).mean()
        accuracy = (chosen > rejected).float().mean()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for g in opt.param_groups:
            g["lr"] = lr * lr_at(step, steps, 0, "linear")
        opt.step()
        opt.zero_grad()
        out.append((loss.item(), accuracy.item(), gn.item()))
    return out
