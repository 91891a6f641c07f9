"""What every training script shares, so that each script shows only what is its own: the start of a
run, clip and step, the throughput window, and the end of a run.
"""
from __future__ import annotations

import time

import torch

from tulu.checkpoint import StopRequest
from tulu.dist import Dist, init_dist, print0
from tulu.export import export_hf
from tulu.fsdp import resolve_compute_dtype
from tulu.model import flash_attn_or_fallback
from tulu.output_dir import hold_output_dir


def start_run(args, seed_per_rank: bool = False) -> tuple[Dist, StopRequest, str, str]:
    """Every script's start, in order: the process group (tulu.dist.init_dist), one writer per
    output_dir, SIGTERM/SIGINT turned into a stop request, the seed (plus the rank with
    seed_per_rank, as the original RLVR seeded its learners), the compute dtype, and the attention
    implementation (flash_attention_2 only where --use_flash_attn can run, else sdpa, said once).
    Returns (d, stop, compute_dtype, attn_implementation)."""
    d = init_dist()
    hold_output_dir(args.output_dir, d.is_main)  # a second run on this output_dir stops here, naming the first
    stop = StopRequest()
    torch.manual_seed(args.seed + (d.rank if seed_per_rank else 0))
    flash = flash_attn_or_fallback(getattr(args, "use_flash_attn", False), d.device)
    return d, stop, resolve_compute_dtype(args.mixed_precision, d.device), "flash_attention_2" if flash else "sdpa"


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor result (clip_grad_norm_ of FSDP parameters returns one)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_and_step(model: torch.nn.Module, optimizer, scheduler, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (a collective over ranks; max_norm <= 0 only measures it), step
    the optimizer and the schedule, drop the gradients. Returns the pre-clip norm, a plain tensor on
    device (read it on log steps only: .item() is a host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return full_value(norm)


class Throughput:
    """Tokens per second between log steps: `add` per micro-batch (host ints, no sync), `lap` at a log
    step returns the window's seconds, tokens/s and padding fraction and starts the next window."""

    def __init__(self):
        self.tokens, self.slots, self.start = 0, 0, time.perf_counter()

    def add(self, tokens: int, slots: int | None = None) -> None:
        """tokens: real (non-pad) tokens; slots: tokens plus padding (default: no padding)."""
        self.tokens += tokens
        self.slots += tokens if slots is None else slots

    def lap(self) -> tuple[float, float, float]:
        seconds = time.perf_counter() - self.start
        out = (seconds, self.tokens / max(seconds, 1e-9), 1 - self.tokens / max(1, self.slots))
        self.tokens, self.slots, self.start = 0, 0, time.perf_counter()
        return out


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(real tokens, slots) of a collated batch: a packed row has no padding, a padded one says so
    in its attention mask."""
    slots = int(batch["input_ids"].numel())
    return (int(batch["attention_mask"].sum()) if "attention_mask" in batch else slots), slots


def finish(stage: str, stopped: bool, model: torch.nn.Module, tokenizer, output_dir: str, is_main: bool) -> None:
    """The end of a run (every rank: the export gathers): the final Hugging Face model in output_dir,
    unless a stop request ended the run early (its checkpoint is then where the rerun resumes)."""
    if stopped:
        return
    export_hf(model, tokenizer, output_dir, is_main)
    print0(f"[{stage}] saved the Hugging Face model to {output_dir}")
