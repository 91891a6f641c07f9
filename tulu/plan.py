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


def print_plan(stage: str, *, world: int, preset: str | None, models: dict, cpu_offload: bool,
               lines: list[tuple[str, object]]) -> None:
    """models: {label: (name_or_path, kind, trained)}; lines: (label, value) rows of the schedule."""
    print(f"== dry run: {stage} at world size {world}" + (f" (preset {preset})" if preset else ""))
    if preset:
        print(f"   launch: {launch_line(preset)}")
    offloaded = "every model's params, the trained ones' grads and AdamW state" if cpu_offload else "nothing"
    for label, value in [*lines, ("offloaded to host", offloaded)]:
        print(f"   {label:<28} {value}")
    total = 0
    for label, (name, kind, trained) in models.items():
        # frozen: bf16 shards, no grads, no optimizer (tulu.model.build_model(frozen=True)); offloaded too
        plan = simulate_model_state(model_config(name), world, "bf16", cpu_offload, kind, frozen=not trained)
        state = plan.model_state_bytes
        device = 0 if cpu_offload else state
        total += device
        print(f"   {label:<28} {name}: {plan.total_params / 1e9:.2f}B params, "
              f"{'trained' if trained else 'frozen'}; per rank {state / GiB:.2f} GiB model state "
              f"({'on the host (offloaded)' if device == 0 else 'on the device'}), largest unit gathered "
              f"{(plan.unit_param_bytes + plan.unit_grad_bytes) / GiB:.2f} GiB")
    print(f"   {'device model state / rank':<28} {total / GiB:.2f} GiB (+ activations, + largest gathered unit)")


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
