"""Per-rank memory of FSDP2 training, simulated at real scale on the meta device, and DeepSpeed's
ZeRO-3 estimate to hold it against.

`simulate_model_state(config, world_size)` builds the HF model from `config` on the meta device,
applies our real sharding (`tulu.fsdp.apply_fsdp`) over a *fake* process group of `world_size`
ranks (torch's "fake" backend: collectives are no-ops, so one process stands in for any rank), builds
our real optimizer (`tulu.optim.build_optimizer`) and takes one AdamW step on meta gradients so the
optimizer creates its real state. Nothing is allocated; an 8B model at 64 ranks takes ~3 s.

Contract for callers (the `--dry_run` of every training script):
- no default process group initialized: the fake group is created here and destroyed before return;
- a process group already initialized (e.g. under torchrun): the simulation runs in a fresh Python
  subprocess (`python -m tulu.memory`, ~5-10 s) and the default group is never touched.
Either way the caller gets the same `MemoryPlan`; bytes are for one rank (`rank`, default 0, which
holds the largest shard of every tensor).

What is counted (the same thing `count_model_state_bytes` measures on a real run after step 1):
- params: the fp32 sharded parameters, padded as FSDP2 stores them (ceil(rows / W) rows per rank);
- grads: the fp32 sharded gradients (reduce_dtype fp32), one padded flat buffer per FSDP unit;
- optim: AdamW exp_avg + exp_avg_sq (fp32, the unpadded local shard) + a 4-byte step per tensor.
The transient is the largest FSDP unit while it is unsharded: its parameters all-gathered in the
compute dtype, their gradients in the compute dtype, and the reduce-scatter staging buffer in the
reduce dtype. Activations, allocator slack and communication buffers of other units are not counted.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

GiB = 2**30

# Llama-3.1 shapes as published (config.json of meta-llama/Llama-3.1-{8B,70B}); Tulu's tokenizer
# fix-up grows the vocabulary to 128264 rows, which changes these numbers by < 0.01 %.
SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),  # Llama-3.2-1B shape, untied
    "llama-100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=12, num_key_value_heads=4),  # 99.5M params
}


def llama_config(shape: str, **overrides):
    """A LlamaConfig for one of SHAPES ("tiny" = tulu.tiny's model), untied embeddings, no cache."""
    from transformers import LlamaConfig

    if shape == "tiny":
        from tulu.tiny import VOCAB_SIZE, tiny_config

        config = tiny_config(VOCAB_SIZE, **{k: v for k, v in overrides.items() if k != "vocab_size"})
        config.vocab_size = overrides.get("vocab_size", config.vocab_size)  # exact: no rounding to 8
        return config
    kw = dict(SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
              use_cache=False)
    return LlamaConfig(**{**kw, **overrides})


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes held by one rank. `*_bytes` fields are exact counts, not estimates of allocator usage."""
    world_size: int
    rank: int
    compute_dtype: str
    cpu_offload: bool
    kind: str
    total_params: int            # P, unique parameters of the unsharded model
    largest_module_params: int   # L as DeepSpeed counts it: the largest single module's own parameters
    largest_unit: str            # FSDP unit (module name, "" = root) with the most parameters
    largest_unit_params: int     # its parameters, unsharded, unpadded
    param_bytes: int             # sharded fp32 params on this rank (padded)
    grad_bytes: int              # sharded fp32 grads on this rank (padded)
    optim_bytes: int             # AdamW exp_avg + exp_avg_sq + step on this rank
    unit_param_bytes: int        # largest unit all-gathered in the compute dtype (padded)
    unit_grad_bytes: int         # its unsharded gradients in the compute dtype
    unit_reduce_bytes: int       # its reduce-scatter staging buffer in the reduce dtype (padded)
    frozen: bool = False         # never trained (tulu.model.build_model(frozen=True)): compute-dtype shards only

    @property
    def model_state_bytes(self) -> int:
        """params + grads + optimizer state (what DeepSpeed's 18P/T counts), wherever they live."""
        return self.param_bytes + self.grad_bytes + self.optim_bytes

    @property
    def device_state_bytes(self) -> int:
        """Persistent model state on the accelerator: 0 with cpu_offload (it all lives on the host)."""
        return 0 if self.cpu_offload else self.model_state_bytes

    @property
    def host_state_bytes(self) -> int:
        return self.model_state_bytes if self.cpu_offload else 0

    @property
    def ds_comparable_bytes(self) -> int:
        """Like for like with DeepSpeed's per-GPU 4L + 18P/T (or 4L offloaded): persistent device
        state + the largest unit's 16-bit params and grads (DeepSpeed's 4L is 2 B param + 2 B grad)."""
        return self.device_state_bytes + self.unit_param_bytes + self.unit_grad_bytes

    @property
    def device_peak_bytes(self) -> int:
        """Persistent device state + the largest unit's own peak in FSDP2's sequence: params and grads
        together at the end of its backward, then (params resharded) grads + reduce-scatter input."""
        return self.device_state_bytes + max(self.unit_param_bytes + self.unit_grad_bytes,
                                             self.unit_grad_bytes + self.unit_reduce_bytes)

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        where = "host" if self.cpu_offload else "device"
        return (f"model state per rank ({self.world_size} ranks, {self.compute_dtype}, {where}): "
                f"params {g(self.param_bytes)} + grads {g(self.grad_bytes)} + optim {g(self.optim_bytes)} = "
                f"{g(self.model_state_bytes)}; largest unit {self.largest_unit or '<root>'} "
                f"({self.largest_unit_params / 1e6:.0f}M params) unsharded {g(self.unit_param_bytes)} "
                f"+ grads {g(self.unit_grad_bytes)}; device peak ~{g(self.device_peak_bytes)} + activations")


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, world_size: int,
                             cpu_offload: bool = False) -> int:
    """Per-GPU bytes from DeepSpeed's `estimate_zero3_model_states_mem_needs` (deepspeed 0.19.8,
    deepspeed/runtime/zero/stage3.py): 4L + int(18P/T) without offload; 4L with offload_param and
    offload_optimizer on cpu. gpu_mem depends only on the total GPU count T, not on the node split."""
    largest_layer_memory = 4 * largest_layer_params
    return largest_layer_memory if cpu_offload else largest_layer_memory + int(18 * total_params / world_size)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shard)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def count_model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Measure what this rank holds now: {"params", "grads", "optim"} in bytes of distinct storages
    (so FSDP2's padding and its one-flat-buffer-per-unit gradients are counted as allocated)."""
    params = [p for p in model.parameters()]
    return {"params": _storage_bytes(params),
            "grads": _storage_bytes(p.grad for p in params if p.grad is not None),
            "optim": _storage_bytes(v for s in optimizer.state.values() for v in s.values()
                                    if isinstance(v, torch.Tensor))}


def _build_meta(config, kind: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    if kind == "reward":
        config.num_labels = 1
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype)


def _simulate(config, world_size: int, rank: int, compute_dtype: str, cpu_offload: bool, kind: str,
              frozen: bool = False) -> MemoryPlan:
    """Needs the fake default group of `world_size` ranks to be initialized."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from tulu.fsdp import DTYPES, apply_fsdp
    from tulu.optim import build_optimizer

    model = _build_meta(config, kind, DTYPES[compute_dtype] if frozen else torch.float32)
    total = sum(p.numel() for p in model.parameters())  # HF ties by sharing the Parameter: counted once
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    mesh = init_device_mesh("cpu", (world_size,))
    apply_fsdp(model, mesh=mesh, compute_dtype=compute_dtype, cpu_offload=cpu_offload)
    # The real optimizer on meta tensors; fused=False because fused kernels refuse the meta device
    # (fused only moves the 4-byte step tensor onto the device: same bytes).
    optimizer = build_optimizer(model, lr=1e-5, fused=False)
    if not frozen:  # a frozen model gets no gradients and no optimizer state
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()

    names = {m: n for n, m in model.named_modules()}
    by_param, units = {}, []
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        if group is not None:
            units.append((names[m], group))
            by_param.update({id(fp.sharded_param): fp for fp in group.fsdp_params})
    param_bytes = grad_bytes = 0
    for p in model.parameters():
        fp = by_param[id(p)]
        padded = fp.padded_sharded_param_size.numel() * p.element_size()
        param_bytes += padded
        grad_bytes += 0 if frozen else padded  # FSDP2 writes grads in the param dtype into a padded flat buffer
    optim_bytes = sum((v.to_local() if hasattr(v, "to_local") else v).numel() * v.element_size()
                      for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))

    def unit_sizes(group):  # (padded numel unsharded, numel, bytes per compute / reduce element)
        padded = sum(fp.padded_sharded_param_size.numel() * world_size for fp in group.fsdp_params)
        orig = sum(fp._orig_size.numel() for fp in group.fsdp_params)
        pdt = group.mp_policy.param_dtype or group.fsdp_params[0].sharded_param.dtype
        return padded, orig, pdt.itemsize, (group.mp_policy.reduce_dtype or pdt).itemsize

    name, group = max(units, key=lambda u: unit_sizes(u[1])[0])
    padded, orig, pbytes, rbytes = unit_sizes(group)
    grads = 0 if frozen else 1
    return MemoryPlan(world_size, rank, compute_dtype, cpu_offload, kind, total, largest_module, name, orig,
                      param_bytes, grad_bytes, optim_bytes, padded * pbytes, grads * orig * pbytes,
                      grads * padded * rbytes, frozen)


def simulate_model_state(config, world_size: int, compute_dtype: str = "bf16", cpu_offload: bool = False,
                         kind: str = "causal_lm", rank: int = 0, frozen: bool = False) -> MemoryPlan:
    """Model-state bytes one rank holds after the first optimizer step with our FSDP2 + AdamW, for an
    HF `config` (any model_type transformers builds; kind "causal_lm" or "reward") on `world_size`
    ranks.
    Safe to call with or without an initialized process group (see the module docstring)."""
    import torch.distributed as dist

    args = dict(world_size=world_size, rank=rank, compute_dtype=compute_dtype, cpu_offload=cpu_offload,
                kind=kind, frozen=frozen)
    if dist.is_available() and dist.is_initialized():
        return _simulate_in_subprocess(config, **args)
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        return _simulate(config.__class__.from_dict(config.to_dict()), **args)  # a copy: never mutate theirs
    finally:
        dist.destroy_process_group()


def _simulate_in_subprocess(config, **args) -> MemoryPlan:
    cls = type(config)
    request = json.dumps({"config_class": f"{cls.__module__}:{cls.__qualname__}", "config": config.to_dict(),
                          "args": args})
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")}
    out = subprocess.run([sys.executable, "-m", "tulu.memory"], input=request, capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory simulation subprocess failed:\n{out.stderr[-4000:]}")
    return MemoryPlan(**json.loads(out.stdout.strip().splitlines()[-1]))


def _main() -> None:
    """`python -m tulu.memory` < JSON request: the subprocess side of simulate_model_state."""
    req = json.loads(sys.stdin.read())
    module, qualname = req["config_class"].split(":")
    config = getattr(importlib.import_module(module), qualname).from_dict(req["config"])
    args = req["args"]
    print(json.dumps(asdict(simulate_model_state(config, **args))), flush=True)


if __name__ == "__main__":
    _main()
