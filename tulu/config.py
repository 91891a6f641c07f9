"""Shared tyro dataclass sections and the CLI parser every script uses.

Each script declares one flat `Args` dataclass that inherits the sections it needs, so flags keep
the original open-instruct names (`--learning_rate`, not `--optim.learning_rate`) and every field's
docstring becomes its `--help` line. Defaults are the original's (open-instruct @e363290), safe for a
real model; where a docstring says so, the Tulu 3 value. The embedded tiny model runs with its own tuned
values, the `tiny` preset (tulu/presets.py), applied when no model is given. The Tulu 3 seed commands
are presets too.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Literal

import tyro

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


@dataclasses.dataclass
class ModelArgs:
    model_name_or_path: str = "tulu/tiny"
    """HF hub name or local folder (safetensors). "tulu/tiny" = the embedded tiny model, built locally."""
    tokenizer_name: str | None = None
    """Tokenizer name or folder (default: the model's)."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    use_slow_tokenizer: bool = False
    """Ask for the slow tokenizer class (Llama 3 has none, so this changes nothing there)."""
    use_flash_attn: bool = False
    """flash-attn 2 varlen attention (GPU only; needs flash-attn). Without either: sdpa with the packed
    block mask, and one warning saying so."""
    chat_template_name: str = "tulu"
    """Chat template: a built-in name ("tulu"), or any other value (say "tokenizer") to keep the
    tokenizer's own, which it must have."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block in backward (activation checkpointing)."""
    cpu_offload: bool = False
    """Keep parameters, gradients and optimizer state on the host (ZeRO-3 offload equivalent)."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after forward (ZeRO-3); False keeps them (ZeRO-2-like)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype; master weights, gradient reduction and optimizer stay fp32. auto = bf16 on GPU, fp32 on CPU."""

    def load_tokenizer(self, chat_template: str | None = None):
        """The tokenizer these flags name (--tokenizer_name, else the model's) with the chat template
        (`chat_template`, else --chat_template_name) set up (tulu.chat)."""
        from tulu.model import load_tokenizer

        return load_tokenizer(self.tokenizer_name or self.model_name_or_path, self.model_revision,
                              chat_template or self.chat_template_name, self.use_slow_tokenizer)


@dataclasses.dataclass
class OptimArgs:
    learning_rate: float = 2e-5
    """Peak AdamW learning rate (the original's default; Tulu 3 8B SFT: 5e-6; the tiny preset: 3e-3)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Schedule after warmup (decays to 0 at the last optimizer step)."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps spent warming up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (1-D parameters never decay)."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clip; <= 0 disables. (Tulu 3 under DeepSpeed effectively clipped at 1.0.)"""
    per_device_train_batch_size: int = 8
    """Sequences (or preference pairs) per micro-batch per rank (the original's default; Tulu 3: 1)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step per rank."""
    num_train_epochs: int = 2
    """Passes over the training data."""
    max_train_steps: int | None = None
    """Stop after this many optimizer steps (overrides num_train_epochs for the schedule)."""

    def schedule(self, optimizer, examples: int, world: int):
        """(global batch, steps per epoch, optimizer steps, the lr schedule over them) for `examples`
        training rows on `world` ranks. The epoch's last step wraps around (tulu.data.step_samples), so
        every step holds exactly the global batch."""
        from tulu.optim import build_scheduler

        global_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps * world
        steps_per_epoch = -(-examples // global_batch)
        total = self.max_train_steps or self.num_train_epochs * steps_per_epoch
        scheduler = build_scheduler(optimizer, total, int(total * self.warmup_ratio), self.lr_scheduler_type)
        return global_batch, steps_per_epoch, total, scheduler
    seed: int = 42
    """Seed for data order, weight init of new rows and every RNG the run draws from."""


@dataclasses.dataclass
class LogArgs:
    output_dir: str = "output/"
    """Where metrics.jsonl, checkpoints and the final Hugging Face model go."""
    exp_name: str = "tulu"
    """Run name prefix (wandb run = {exp_name}__{seed}__{time})."""
    with_tracking: bool = False
    """Log to the tracker named by --report_to."""
    report_to: str = "wandb"
    """Tracker: wandb (offline mode when no API key is set)."""
    wandb_project: str = "tulu"
    """wandb project."""
    wandb_entity: str | None = None
    """wandb entity (team or user)."""
    logging_steps: int = 1
    """Log every this many optimizer steps (the only host syncs in the loop)."""


@dataclasses.dataclass
class CheckpointArgs:
    checkpointing_steps: str | None = None
    """Save a resumable checkpoint every N optimizer steps, or "epoch" at each epoch end."""
    keep_last_n_checkpoints: int = 3
    """Keep the newest K complete checkpoints (pruned only after a new one is complete); -1 keeps all."""
    resume_from_checkpoint: str | None = "auto"
    """A checkpoint folder, or "auto": the newest complete one under output_dir/checkpoints, if any."""
    overwrite_output_dir: bool = False
    """Start fresh even when output_dir holds checkpoints (they are overwritten as new ones are saved)."""
    save_hf_every_checkpoint: bool = False
    """Also export a Hugging Face folder (output_dir/checkpoints/hf_step_N) at every checkpoint."""

    def should_save(self, completed_steps: int, steps_per_epoch: int) -> bool:
        spec = self.checkpointing_steps
        if not spec:
            return False
        if spec == "epoch":
            return completed_steps % steps_per_epoch == 0
        if not spec.isdigit() or int(spec) <= 0:
            raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {spec!r}")
        return completed_steps % int(spec) == 0


@dataclasses.dataclass
class HeadArgs:
    """How the trained model's output is turned into a loss (SFT and DPO)."""
    chunked_lm_head: bool = True
    """Log-probs through the LM head a chunk of tokens at a time, recomputed in backward (tulu/lm_head.py):
    the (tokens, vocab) logits are never built. False: the model's full logits."""
    load_balancing_loss: bool = False
    """Add a mixture-of-experts router's load-balancing loss (OLMoE, Qwen3-MoE; the Switch Transformer
    loss, Fedus et al. 2021) times --load_balancing_weight to each micro-batch, averaged over the step's
    micro-batches and ranks as the original's DeepSpeed scaling did."""
    load_balancing_weight: float = 0.5
    """Weight of the load-balancing loss (the original SFT's default: 0.5; DPO's is 0.001)."""


@dataclasses.dataclass
class EngineArgs:
    """The rollout engine pool (rollout/): which engines, where, in which dtype, how they are checked."""
    engine: Literal["auto", "torch", "vllm"] = "auto"
    """Rollout engine: vllm on GPU, torch (TorchEngine) on CPU."""
    vllm_num_engines: int = 1
    """Engine processes (each its own GPU(s), or a share of CPU threads)."""
    vllm_tensor_parallel_size: int = 1
    """GPUs per vLLM engine."""
    vllm_gpu_memory_utilization: float = 0.9
    """Fraction of each engine GPU's memory vLLM may take (weights + KV cache; vLLM's default)."""
    vllm_kv_cache_gib: float | None = None
    """vLLM KV cache size per engine (default: from vllm_gpu_memory_utilization on GPU; 1 GiB on CPU)."""
    vllm_enforce_eager: bool = False
    """Run vLLM without torch.compile / CUDA graphs (faster start, slower decoding; always on CPU here)."""
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights the engines sample with (auto: bf16 for vLLM on GPU, fp32 on CPU); they are sent in it."""
    sync_check_steps: int | None = None
    """Every N steps, after the weight sync, every engine samples a fixed probe batch that the trainer
    scores; a gap above sync_check_tol stops the run naming the engine. Default: every step in sync
    mode, off in async mode; 0: off."""
    sync_check_tol: float | None = None
    """Mean |Δ log p| per probe token allowed (default 1e-3 for fp32 engines, 0.1 for bf16 ones:
    bf16 kernels alone differ by ~1e-2, so there only a garbled or skipped sync of a moving model shows)."""
    async_mode: bool = True
    """Generate the next batch while training on this one (one step off-policy, as the original)."""
    engine_timeout_s: float = 3600.0
    """Longest an engine may take to generate one batch. Trainer ranks wait for generation without a
    collective timeout (the original waited without limit); this is what ends a hung engine's run."""


@dataclasses.dataclass
class PlanArgs:
    preset: str | None = None
    """A Tulu 3 seed command (tulu/presets.py): tulu3_8b_sft, tulu3_70b_sft, tulu3_8b_dpo, tulu3_70b_dpo,
    tulu3_8b_rm, tulu3_8b_rlvr, tulu3_70b_rlvr; or tiny: the embedded tiny model's tuned values (applied
    by itself when no --model_name_or_path is given). Flags given override it."""
    dry_run: bool = False
    """Print the plan (batch, steps, tokens, per-rank memory, offload) at --dry_run_world_size and exit."""
    dry_run_world_size: int | None = None
    """World size of the plan (default: the preset's original topology, else 1)."""


def _bool_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}


def normalize_bool_flags(cls, argv: list[str]) -> list[str]:
    """Accept both spellings the seed commands use: bare `--with_tracking` and `--use_lora False` /
    `--apply_verifiable_reward true`."""
    names, out, i = _bool_fields(cls), [], 0
    while i < len(argv):
        tok = argv[i]
        out.append(tok)
        if tok.startswith("--") and tok[2:] in names:
            nxt = argv[i + 1].lower() if i + 1 < len(argv) else None
            if nxt in _TRUE | _FALSE:
                out.append("True" if nxt in _TRUE else "False")
                i += 1
            else:
                out.append("True")
        i += 1
    return out


def cli(cls, argv: list[str] | None = None, description: str | None = None, script: str | None = None):
    """Parse argv into `cls` (flat flags with underscores, explicit True/False for booleans). `script`
    (default: the running one) picks the presets that apply: a Tulu 3 seed command, or the tiny one."""
    from tulu.presets import expand, expand_tiny

    script = script or sys.argv[0]
    argv, said = expand_tiny(list(sys.argv[1:] if argv is None else argv), script)
    if said and os.environ.get("RANK", "0") == "0" and "--help" not in argv and "-h" not in argv:
        print(said, flush=True)
    argv, _ = expand(argv, script)
    argv = normalize_bool_flags(cls, argv)
    return tyro.cli(cls, args=argv, config=(tyro.conf.FlagConversionOff,), use_underscores=True,
                    description=description)
