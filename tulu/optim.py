"""AdamW with decay / no-decay groups, and the learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only. open-instruct exempted names containing "bias"/"layer_norm.weight", which
    missed Llama's RMSNorm weights; we exempt every 1-D parameter (biases and norms). Identical at
    weight_decay=0, the Tulu 3 setting for SFT and DPO."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW on the (fp32, sharded) parameters. fused on GPU, as the original's fused_optimizer."""
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, total_steps: int, warmup_steps: int, kind: str = "linear") -> float:
    """LR multiplier at optimizer step `step` (0-based), as transformers' get_scheduler: linear warmup
    to 1 over warmup_steps, then linear or cosine decay to 0 at total_steps, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup_steps, kind))
