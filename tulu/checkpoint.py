"""Checkpoints and Hugging Face export.

Export is a streamed gather: parameters are all-gathered one at a time (a collective on every rank)
and rank 0 appends each to the current safetensors shard, writing the shard out when it reaches
`max_shard_bytes`. Rank 0's extra memory peaks at one shard, never the whole model. The folder is
written under a temporary name and published with a rename, so a crash never leaves a complete-
looking export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tulu.dist import barrier

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
    shard: dict[str, torch.Tensor] = {}
    files: list[dict[str, torch.Tensor]] = []  # only names are kept per written shard
    weight_map: dict[str, str] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            files.append(dict.fromkeys(shard))
            shard, shard_bytes = {}, 0

    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(model, n)]
    for name, p in tensors:
        full = full_tensor(p)  # collective: all ranks, same order
        if is_main:
            t = full.to("cpu", dtype if full.is_floating_point() else full.dtype).contiguous()
            if shard_bytes + t.numel() * t.element_size() > max_shard_bytes:
                flush()
            shard[name] = t
            shard_bytes += t.numel() * t.element_size()
        del full
    if is_main:
        flush()
        if len(files) == 1:
            os.rename(tmp / "model-00001.safetensors", tmp / "model.safetensors")
        else:
            total = sum(model.get_parameter(n).numel() for n in weight_map if _is_param(model, n))
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_parameters": total}, "weight_map": weight_map}, indent=2))
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


def _is_param(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False
