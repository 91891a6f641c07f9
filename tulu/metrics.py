"""Named metrics: accumulate on device, reduce across ranks with one all_reduce per log step, then
write to stdout, output_dir/metrics.jsonl and (optionally) wandb. Nothing here syncs the host
except `log()`, which the loop calls only on log steps.
"""
from __future__ import annotations

import dataclasses
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
    """add(name, value, weight) accumulates on this rank; log(step) reports, per name, Σ value / Σ weight
    over the window and over every rank (every rank must call log: it is a collective).

    value is a sum over `weight` units: a DPO micro-batch adds its summed accuracy with weight = its
    pairs, so the log is the per-pair mean of the window, however pairs fell on micro-batches and
    ranks. A plain observation has weight 1. A loss adds `weight · loss` with weight `weight · count`,
    the micro-batch's share of the step (tulu.losses.micro_batch_weight): the shares of a step sum to
    1, so the log is the step's objective, averaged over the window's steps."""

    def __init__(self, output_dir: str, is_main: bool, device: torch.device, tracker=None):
        self.is_main, self.device, self.tracker = is_main, device, tracker
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.path = Path(output_dir) / "metrics.jsonl"
        if is_main:
            os.makedirs(output_dir, exist_ok=True)

    def _tensor(self, x) -> torch.Tensor:  # stays on device: no host sync outside log()
        return x.detach().float().to(self.device) if torch.is_tensor(x) else torch.tensor(float(x), device=self.device)

    def add(self, name: str, value: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0) + self._tensor(value)
        self.weights[name] = self.weights.get(name, 0) + self._tensor(weight)

    def log(self, step: int, extra: dict[str, float] | None = None,
            ratios: dict[str, tuple[str, str]] | None = None) -> dict[str, float]:
        """Reduce and emit. `extra` holds values already global (lr, throughput), logged as given;
        `ratios` adds name = numerator / denominator of two reduced metrics (e.g. loss per token)."""
        names = sorted(self.sums)  # same order on every rank (all ranks add the same names)
        out: dict[str, float] = {}
        if names:
            local = torch.stack([self.sums[n] for n in names] + [self.weights[n] for n in names])  # (2M,)
            total = all_reduce(local).tolist()  # the one host sync of a log step
            out = {n: v / w if w else float("nan") for n, v, w in zip(names, total[:len(names)], total[len(names):])}
        out.update(extra or {})
        for name, (num, den) in (ratios or {}).items():
            out[name] = out[num] / max(out[den], 1e-12)
        self.sums, self.weights = {}, {}
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **out}) + "\n")
            if self.tracker is not None:
                self.tracker.log(out, step=step)
        return out


def run_metrics(args, d) -> tuple[Metrics, Metrics]:
    """The run's two metric windows, on one tracker (wandb with --with_tracking): training lines, and
    eval lines, kept apart so that an evaluation never flushes a half-filled training window."""
    tracker = start_tracker(args, dataclasses.asdict(args))
    return (Metrics(args.output_dir, d.is_main, d.device, tracker),
            Metrics(args.output_dir, d.is_main, d.device, tracker))


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
