"""Named metrics: accumulate on device, reduce across ranks with one all_reduce per log step, then
write to stdout, output_dir/metrics.jsonl and (optionally) wandb. Nothing here syncs the host
except `log()`, which the loop calls only on log steps.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tulu.dist import all_reduce

# Peak dense bf16 FLOP/s per GPU, from the vendor data sheets (NVIDIA H100 SXM / H200 SXM: 989.4
# TFLOP/s dense bf16; A100 SXM: 312). Used for MFU only.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·layers·hidden·seq (PaLM paper, Chowdhery et al. 2022, App. B)."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`; $TULU_PEAK_TFLOPS overrides it (a GPU missing from the
    table, or a CPU). None: unknown, so no MFU is logged."""
    if os.environ.get("TULU_PEAK_TFLOPS"):
        return float(os.environ["TULU_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """flops_per_token for a (sharded) HF model: N counts every parameter, embeddings included."""
    cfg = model.config
    return flops_per_token(sum(p.numel() for p in model.parameters()), cfg.num_hidden_layers, cfg.hidden_size, seq_len)


def mfu(trained: list[tuple[int, float]], forward_only: list[tuple[int, float]], seconds: float,
        peak: float | None) -> dict[str, float]:
    """{"perf/mfu": ...} for one device's window: `trained` and `forward_only` list (tokens,
    flops_per_token) per model; a forward is a third of forward+backward (the 6N = 2N + 4N split).
    Empty when the peak is unknown."""
    if not peak or seconds <= 0:
        return {}
    flops = sum(t * f for t, f in trained) + sum(t * f / 3 for t, f in forward_only)
    return {"perf/mfu": flops / seconds / peak}


class Metrics:
    """add(name, value) accumulates a running mean per name on this rank; log(step) averages each
    name over the window and over ranks (every rank must call log: it is a collective)."""

    def __init__(self, output_dir: str, is_main: bool, device: torch.device, tracker=None):
        self.is_main, self.device, self.tracker = is_main, device, tracker
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.path = Path(output_dir) / "metrics.jsonl"
        if is_main:
            os.makedirs(output_dir, exist_ok=True)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().float().to(self.device) if torch.is_tensor(value) else torch.tensor(float(value), device=self.device)
        self.sums[name] = self.sums.get(name, 0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def log(self, step: int, extra: dict[str, float] | None = None,
            ratios: dict[str, tuple[str, str]] | None = None) -> dict[str, float]:
        """Reduce and emit. `extra` holds values already global (lr, throughput), logged as given;
        `ratios` adds name = numerator / denominator of two reduced metrics (e.g. loss per token)."""
        names = sorted(self.sums)  # same order on every rank (all ranks add the same names)
        out: dict[str, float] = {}
        if names:
            local = torch.stack([self.sums[n] / self.counts[n] for n in names])  # (M,)
            values = all_reduce(local, "avg").tolist()  # the one host sync of a log step
            out = dict(zip(names, values))
        out.update(extra or {})
        for name, (num, den) in (ratios or {}).items():
            out[name] = out[num] / max(out[den], 1e-12)
        self.sums, self.counts = {}, {}
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **out}) + "\n")
            if self.tracker is not None:
                self.tracker.log(out, step=step)
        return out


def start_tracker(args, config: dict):
    """wandb run when --with_tracking --report_to wandb (offline mode when no API key), else None."""
    if not args.with_tracking:
        return None
    if args.report_to != "wandb":
        raise ValueError(f"--report_to {args.report_to!r}: only wandb is supported")
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=name, config=config,
                      dir=args.output_dir, mode=os.environ.get("WANDB_MODE", mode))
