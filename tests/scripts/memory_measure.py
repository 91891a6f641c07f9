"""Measure the model-state bytes each rank really holds after one FSDP2 + AdamW step.

    torchrun --standalone --nproc_per_node 2 tests/scripts/memory_measure.py --shape tiny --out /tmp/m.json

Each rank writes {"rank", "world_size", "params", "grads", "optim"} (tulu.memory.count_model_state_bytes)
to OUT.rank<R>.json; the caller compares them with tulu.memory.simulate_model_state for the same
shape, world size and rank (tests/test_memory.py, benchmarks/memory.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from tulu.dist import init_dist
from tulu.fsdp import apply_fsdp
from tulu.memory import count_model_state_bytes, llama_config
from tulu.model import init_buffers
from tulu.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", help="tiny or a key of tulu.memory.SHAPES")
    ap.add_argument("--vocab_size", type=int, default=None, help="override the vocabulary rows (odd: padding)")
    ap.add_argument("--compute_dtype", default="bf16")
    ap.add_argument("--seq_len", type=int, default=16)
    ap.add_argument("--cpu_offload", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    d = init_dist()
    config = llama_config(args.shape, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_fsdp(model, compute_dtype=args.compute_dtype, cpu_offload=args.cpu_offload)
    # exactly tulu.model.build_model's path, minus reading weights
    model.to_empty(device="cpu" if args.cpu_offload else d.device)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.normal_(0, 0.02) if p.ndim >= 2 else local.fill_(1.0)
    init_buffers(model)
    optimizer = build_optimizer(model, lr=1e-4)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=g).to(d.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    measured = count_model_state_bytes(model, optimizer)
    if d.device.type == "cuda":  # device view: persistent + everything transient (activations included)
        measured.update(cuda_allocated=torch.cuda.memory_allocated(), cuda_max_allocated=torch.cuda.max_memory_allocated())
    with open(f"{args.out}.rank{d.rank}.json", "w") as f:
        json.dump({"rank": d.rank, "world_size": d.world, "loss": loss.item(), **measured}, f)

    del model, optimizer, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # avoids the flaky abort at interpreter teardown (seen on torch 2.13 CPU)


if __name__ == "__main__":
    main()
