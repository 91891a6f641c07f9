"""Checkpoints and Hugging Face export.

Export is a streamed gather: the shard files are planned from the parameters' shapes (at most
`max_shard_bytes` each), then parameters are all-gathered one at a time (a collective on every
rank) and rank 0 writes each straight into its file (tulu.tensorfile.TensorWriter). Rank 0's extra
host memory peaks at one tensor, never a shard or the whole model. The folder is written under a
temporary name and published with a rename, so a crash never leaves a complete-looking export.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from tulu.dist import barrier
from tulu.layouts import Layout
from tulu.tensorfile import TensorWriter

DEFAULT_SHARD_BYTES = 5 * 2**30


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter on every rank (collective for DTensors). CPU-offloaded shards are moved to
    the mesh's device first, since nccl cannot gather host memory."""
    if not hasattr(p, "to_local"):
        return p.detach()
    from torch.distributed.tensor import DTensor

    local = p.to_local().detach()
    if local.device.type != p.device_mesh.device_type:
        local = local.to(p.device_mesh.device_type)
        p = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return p.full_tensor().detach()


def export_dtype(model) -> torch.dtype:
    """Save in the dtype of the checkpoint we started from (bf16 for Llama 3.1, fp32 for the tiny model)."""
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, is_main: bool,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a Hugging Face folder: safetensors shards (+ index), config, generation
    config, tokenizer with its chat template. Every rank must call this (gathers are collective)."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-export"
    dtype = dtype or export_dtype(model)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)]
    # The checkpoint layout (tulu/layouts.py): a parameter the class keeps fused in memory (an MoE
    # layer's experts) is written as the per-expert tensors save_pretrained would write.
    layout = Layout(model)
    specs, owner = [], []  # one spec per written tensor; owner: the index of the tensor it comes from
    for j, (n, t) in enumerate(tensors):
        for name, shape in layout.checkpoint_shapes(n, tuple(t.shape)):
            specs.append((name, dtype if t.is_floating_point() else t.dtype, shape))
            owner.append(j)
    shards = plan_shards(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total_bytes = sum(math.prod(shape) * dt.itemsize for _, dt, shape in specs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"export {out_dir}", mininterval=5,
               disable=not is_main or total_bytes < 2**30)  # a bar only where it takes a while
    gathered, parts = -1, {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = TensorWriter(tmp / fname, [specs[i] for i in shard], {"format": "pt"}) if is_main else None
        for i in shard:
            if owner[i] != gathered:  # gather each tensor once, even when its parts span two files
                gathered, parts = owner[i], {}
                full = full_tensor(tensors[gathered][1])  # collective: all ranks, same order
                if is_main:
                    parts = dict(layout.to_checkpoint(tensors[gathered][0], full))
                del full
            if is_main:
                out = parts.pop(specs[i][0]).to(specs[i][1])
                writer.write(out)
                weight_map[specs[i][0]] = fname
                bar.update(out.numel() * out.element_size())
        if is_main:
            writer.close()
    bar.close()
    if is_main:
        if len(shards) > 1:
            n_params = sum(p.numel() for p in model.parameters())  # every parameter is in the weight map
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_parameters": n_params}, "weight_map": weight_map}, indent=2))
        model.config.dtype = dtype
        # The class that was trained, not the checkpoint we started from (an RM starts from a causal
        # LM), and not FSDP's wrapper subclass (FSDPLlamaFor...).
        model.config.architectures = [next(c.__name__ for c in type(model).__mro__
                                           if c.__module__.startswith("transformers"))]
        model.config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    barrier()


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive tensors (indices into specs) per file, each file at most max_shard_bytes unless a
    single tensor is larger. From shapes alone, so every rank plans the same files before any gather
    and each file's header can be written before its tensors are streamed in."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(specs):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished export into out_dir, which may also hold metrics and checkpoints. Old weight
    files go first and config.json comes last, so a crash part-way leaves a folder that
    `from_pretrained` refuses (no config) rather than one that loads a mix of two models."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)
    for old in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        old.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def _non_persistent(model: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rsplit(".", 1)[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))
