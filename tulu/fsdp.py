"""Parallelism as a transform: FSDP2 per decoder block, then the root (the torchtitan recipe).

`apply_fsdp` never builds or loads anything: call it on a model built on the meta device, then
materialize and load weights (tulu/model.py). Mixed precision = bf16 compute on fp32 master weights
with fp32 gradient reduction, summed over ranks (the scripts' loss weights carry the normalization);
CPU offload = parameters, gradients and optimizer state on the host
(the ZeRO-3-offload equivalent); activation checkpointing recomputes each block in backward.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_compute_dtype(mixed_precision: str, device: torch.device) -> str:
    """The --mixed_precision setting made concrete: "auto" is bf16 on GPU and fp32 on CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device.type == "cuda" else "fp32"


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the class names HF lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found (_no_split_modules={sorted(names)})")
    return blocks


def apply_fsdp(
    model: torch.nn.Module,
    mesh: DeviceMesh | None = None,
    compute_dtype: str = "bf16",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Shard `model` in place over `mesh` (default: all ranks of the default group) and return it.

    reshard_after_forward=False keeps each block's full parameters from forward to backward
    (ZeRO-2-like: more memory, one all-gather less per block).
    """
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    dtype = DTYPES[compute_dtype]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    # pin_memory=False on CPU: pinning needs an accelerator (measured: fully_shard raises without one).
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, offload_policy=offload, **({"mp_policy": mp} if mp else {}))
    # Untied embeddings and lm_head are the largest single modules (525M params each at 8B); as
    # units of their own, only one of them is ever gathered at a time, which is what keeps the
    # transient at DeepSpeed's "largest layer" L instead of 2L (benchmarks/memory.py). A tied pair
    # is one parameter and stays in the root.
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    untied = emb_out is not None and emb_out.weight is not emb_in.weight
    if untied:
        fully_shard(emb_in, reshard_after_forward=reshard_after_forward, **kw)
    for block in decoder_blocks(model):
        if activation_checkpointing:
            checkpoint(block)  # composable API: keeps parameter names unchanged (checkpoints stay portable)
        # A mixture-of-experts layer's experts (most of its weights) are a unit of their own: gathered
        # for the expert computation only, not for the whole block's attention too.
        for name, sub in block.named_modules():
            if name.endswith("experts") and any(True for _ in sub.parameters(recurse=False)):
                fully_shard(sub, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    if untied:  # lm_head runs last in forward and first in backward: keep it gathered in between
        fully_shard(emb_out, reshard_after_forward=False, **kw)
    # The root holds what is left (final norm; tied embeddings; a reward head).
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    sum_gradients_over_ranks(model)
    return model


def sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """Make every FSDP unit SUM the ranks' gradients instead of averaging them (torchtitan does the
    same): the scripts weight each micro-batch's summed loss by its share of the whole step
    (tulu.losses.micro_batch_weight), so the reduction must not divide by the world size again.
    Sum-only collectives: gloo has no PREMUL_SUM, the op a divide factor would otherwise use."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit of `model` back in shards; a no-op for a plain module.

    A forward with no backward after it leaves the units that keep their parameters gathered
    after forward (the root; an untied lm_head, reshard_after_forward=False above) unsharded, with
    their registered Parameters swapped for plain full tensors. `model.reshard()` covers the root
    only; a checkpoint or weight sync read then would see the full lm_head (measured: the next
    backward then failed to free it, "Trying to resize storage that is not resizable")."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def no_grad_forward(*models: torch.nn.Module | None):
    """`with no_grad_forward(reference): out = reference(...)`: a forward that no backward follows
    (a frozen model, scoring, evaluation), then every FSDP unit of `models` back in shards (reshard)."""
    with torch.no_grad():
        yield
    for model in models:
        if model is not None:
            reshard(model)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's piece of a (possibly FSDP-sharded, dim-0) parameter and its first global row: what
    loading, checkpoints and memory counts read. FSDP2 gives rank r rows [r·⌈n/W⌉, (r+1)·⌈n/W⌉)."""
    if not hasattr(p, "to_local"):
        return p.data, 0
    local = p.to_local()
    mesh = p.device_mesh
    chunk = math.ceil(p.shape[0] / mesh.size()) if p.ndim else 0
    return local, chunk * mesh.get_local_rank()
