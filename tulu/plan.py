"""`--dry_run`: the plan of a run at its real scale, printed without a GPU, a download or the data.

The model is built on the meta device and sharded with our real apply_fsdp and AdamW under a fake
process group of the requested world size (tulu/memory.py), so the per-rank memory printed is what
the run would hold. Hub models are not downloadable here: the Llama 3.1 shapes the Tulu 3 runs use
are known by name; any other model needs a local folder. The data is counted when it can be loaded
(embedded or local); otherwise the plan says so and shows per-step numbers only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from tulu.memory import GiB, llama_config, simulate_model_state
from tulu.presets import PRESETS, launch_line

# Hub names of the Tulu 3 runs -> Llama shapes (configs from the Llama 3.1 model cards).
KNOWN_SHAPES = {"Llama-3.1-8B": "llama-3.1-8b", "Llama-3.1-70B": "llama-3.1-70b",
                "Llama-3.1-Tulu-3-8B": "llama-3.1-8b", "Llama-3.1-Tulu-3-70B": "llama-3.1-70b"}


def model_config(name: str):
    """The HF config of `name`: a known Tulu 3 shape, or a local / cached folder."""
    base = name.split("/")[-1]
    for prefix, shape in KNOWN_SHAPES.items():
        if base == prefix or base.startswith(prefix + "-"):
            return llama_config(shape)
    from transformers import AutoConfig

    from tulu.model import resolve

    return AutoConfig.from_pretrained(resolve(name), trust_remote_code=False)


def count_rows(mixer: dict, split: str = "train") -> int | None:
    """Rows the mixture would give, or None when some source cannot be loaded here."""
    from pathlib import Path

    from tulu import synth
    from tulu.mixer import load_mixture

    if not all(name in synth.NAMES or Path(name).exists() for name in mixer):
        return None  # hub data: a dry run never downloads
    try:
        return sum(len(ds) for _, ds in load_mixture(mixer, split=split, shuffle=False))
    except Exception:
        return None


def default_world(preset: str | None, given: int | None) -> int:
    if given:
        return given
    if preset:
        nodes, per_node = PRESETS[preset]["launch"]
        return nodes * per_node
    return int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class StepPlan:
    """What one rank runs at a time, for the peak beyond model state (tulu/activations.py)."""
    train_tokens: int | None            # tokens of one training micro-batch (rows x length); None: unknown
    forward_tokens: int | None = None   # tokens of one no-grad forward of a frozen model (default: train_tokens)
    checkpointing: bool = False
    chunked: bool = True
    repeat_kv: bool = True              # sdpa with a mask repeats k, v to the query heads; flash-attn does not
    mixed_precision: str = "auto"       # the script's flag: auto and bf16 plan bf16 (a GPU run), fp32 plans fp32
    engine: tuple[int, int, int] | None = None  # RLVR: (sequences per engine, tokens each, GPUs per engine)

    @property
    def compute_bytes(self) -> int:
        return 4 if self.mixed_precision == "fp32" else 2


GPU_GIB = 80
USABLE = 0.9  # of the GPU: the rest for the CUDA context, NCCL buffers and allocator slack (not counted)


def step_peak(models: dict, plans: dict, configs: dict, step: StepPlan, cpu_offload: bool) -> tuple[int, str]:
    """(bytes, what peaks) on one rank's device: model state (no gradients until backward) plus the
    largest moment: a trained model's micro-batch (its gathered unit, every gradient shard by its last
    block) or a frozen model's forward."""
    from tulu.activations import frozen_forward_bytes, step_memory

    fixed = 0 if cpu_offload else sum(p.param_bytes + p.optim_bytes for p in plans.values())
    grads = 0 if cpu_offload else sum(p.grad_bytes for p in plans.values())
    b, moments = step.compute_bytes, {}
    for label, (_, kind, trained) in models.items():
        plan, config, head = plans[label], configs[label], kind != "reward"
        if trained:
            sm = step_memory(config, step.train_tokens, b, step.checkpointing, step.chunked, step.repeat_kv, head)
            unit = plan.unit_param_bytes + plan.unit_grad_bytes + plan.unit_reduce_bytes
            moments[f"{label} backward"] = unit + sm.peak(grads, step.checkpointing)
        else:
            tokens = step.forward_tokens or step.train_tokens
            moments[f"{label} forward"] = grads + plan.unit_param_bytes + frozen_forward_bytes(config, tokens, b,
                                                                                                step.chunked, head)
    worst = max(moments, key=moments.get)
    return fixed + moments[worst], worst


def print_plan(stage: str, *, world: int, preset: str | None, models: dict, cpu_offload: bool,
               lines: list[tuple[str, object]], step: StepPlan | None = None) -> None:
    """models: {label: (name_or_path, kind, trained)}; lines: (label, value) rows of the schedule."""
    print(f"== dry run: {stage} at world size {world}" + (f" (preset {preset})" if preset else ""))
    if preset:
        print(f"   launch: {launch_line(preset)}")
    offloaded = "every model's params, the trained ones' grads and AdamW state" if cpu_offload else "nothing"
    for label, value in [*lines, ("offloaded to host", offloaded)]:
        print(f"   {label:<28} {value}")
    total, plans, configs = 0, {}, {}
    for label, (name, kind, trained) in models.items():
        # frozen: bf16 shards, no grads, no optimizer (tulu.model.build_model(frozen=True)); offloaded too
        configs[label] = model_config(name)
        plans[label] = plan = simulate_model_state(configs[label], world, "bf16", cpu_offload, kind, frozen=not trained)
        state = plan.model_state_bytes
        device = 0 if cpu_offload else state
        total += device
        print(f"   {label:<28} {name}: {plan.total_params / 1e9:.2f}B params, "
              f"{'trained' if trained else 'frozen'}; per rank {state / GiB:.2f} GiB model state "
              f"({'on the host (offloaded)' if device == 0 else 'on the device'}), largest unit gathered "
              f"{(plan.unit_param_bytes + plan.unit_grad_bytes) / GiB:.2f} GiB")
    print(f"   {'device model state / rank':<28} {total / GiB:.2f} GiB")
    if step is None or not step.train_tokens:
        print(f"   {'peak / rank':<28} not planned: the micro-batch length is unknown (set the max length flag)")
        return
    peak, worst = step_peak(models, plans, configs, step, cpu_offload)
    fits = peak <= USABLE * GPU_GIB * GiB
    head = ("chunked" if step.chunked else "full logits") if any(k != "reward" for _, k, _ in models.values()) \
        else "none (a score head)"
    print(f"   {'micro-batch':<28} {step.train_tokens} tokens; activation checkpointing "
          f"{'on' if step.checkpointing else 'off'}; LM head {head}")
    print(f"   {'peak / rank':<28} {peak / GiB:.2f} GiB (at the {worst}): "
          + (f"fits an {GPU_GIB} GB GPU" if fits else f"does NOT fit an {GPU_GIB} GB GPU")
          + f" ({USABLE:.0%} usable)")
    if not fits:
        print(f"   {'to fit':<28} {what_fits(models, plans, configs, step, cpu_offload)}")
    if step.engine:
        seqs, length, gpus = step.engine
        from tulu.activations import kv_cache_bytes

        policy = next(iter(models))
        kv, weights = kv_cache_bytes(configs[policy], seqs, length), 2 * plans[policy].total_params
        print(f"   {'engine memory / GPU':<28} {(kv + weights) / gpus / GiB:.2f} GiB: bf16 weights "
              f"{weights / GiB:.2f} GiB + KV cache for all {seqs} sequences x {length} tokens at once "
              f"{kv / GiB:.2f} GiB, over {gpus} GPU(s) (vLLM runs fewer at once when its cache is smaller)")


def what_fits(models: dict, plans: dict, configs: dict, step: StepPlan, cpu_offload: bool) -> str:
    """The first single change, in the order a user would try them, under which the peak fits."""
    from dataclasses import replace

    budget = USABLE * GPU_GIB * GiB
    tries = [("--gradient_checkpointing", replace(step, checkpointing=True), cpu_offload),
             ("--chunked_lm_head true", replace(step, chunked=True), cpu_offload),
             ("both of those", replace(step, checkpointing=True, chunked=True), cpu_offload),
             ("--cpu_offload", step, True),
             ("--gradient_checkpointing --cpu_offload", replace(step, checkpointing=True), True)]
    for flag, s, offload in tries:
        if s != step or offload != cpu_offload:
            peak, _ = step_peak(models, plans, configs, s, offload)
            if peak <= budget:
                return f"{flag} ({peak / GiB:.2f} GiB)"
    return "none of activation checkpointing, the chunked head or offload alone: more ranks or shorter rows"


def steps_line(rows: int | None, global_batch: int, epochs: int, max_steps: int | None, warmup_ratio: float):
    """(steps, schedule rows) for epoch-based scripts."""
    if max_steps:
        steps = max_steps
    elif rows is None:
        return None, [("data", "not loadable here: steps depend on its size (per-step numbers above)")]
    else:
        steps = epochs * math.ceil(rows / global_batch)
    return steps, [("rows", rows if rows is not None else "unknown"), ("optimizer steps", steps),
                   ("warmup steps", int(steps * warmup_ratio))]
