"""RL with verifiable rewards (Tulu 3 stage 4): PPO exactly as the original, GRPO, and the variants
Dr. GRPO, DAPO and GSPO (--algo; one row each in tulu/rl_algorithms.py).

Generation runs in a pool of engine processes (rollout/: vLLM on GPUs, TorchEngine on CPU) that get
the new weights after every step through their own process group. --async_mode (default, as the
original) generates the next batch while this one trains: one step off-policy.

Embedded default (CPU): the tiny model on synthetic arithmetic prompts, verified with the GSM8K rule.
    torchrun --standalone --nproc_per_node 2 train/rlvr.py --model_name_or_path output/demo/sft
GRPO normalizes within each prompt's group of samples, so it needs several (the default is 1, as the original):
    torchrun --standalone --nproc_per_node 2 train/rlvr.py --model_name_or_path output/demo/sft --algo grpo \
      --number_samples_per_prompt 4 --local_rollout_batch_size 16

Tulu 3 8B RLVR (open-instruct docs/tulu3.md; 7 learner GPUs + 1 vLLM GPU):
    torchrun --nproc_per_node 7 train/rlvr.py --dataset_mixer '{"allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": 1.0}' \
      --dataset_train_splits train --dataset_eval_mixer '{"allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": 128}' \
      --dataset_eval_splits train --max_token_length 2048 --max_prompt_token_length 2048 --response_length 2048 \
      --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-DPO --reward_model_path allenai/Llama-3.1-Tulu-3-8B-RM \
      --non_stop_penalty --stop_token eos --temperature 1.0 --ground_truths_key ground_truth --chat_template tulu \
      --sft_messages_key messages --learning_rate 3e-7 --total_episodes 10000000 --penalty_reward_value -10.0 \
      --per_device_train_batch_size 2 --local_rollout_forward_batch_size 2 --local_mini_batch_size 32 \
      --local_rollout_batch_size 32 --num_epochs 4 --beta 0.05 --apply_verifiable_reward true \
      --reward_model_multiplier 0.0 --num_evals 3 --save_freq 100 --seed 3 --gradient_checkpointing --with_tracking
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
from tqdm import tqdm

from rollout.engine import SamplingParams
from rollout.pool import EnginePool
from rollout.serve import serve_args
from rollout.groups import wait_together
from rollout.weight_sync import WeightSync
from tulu.checkpoint import export_hf
from tulu.config import LogArgs, PlanArgs, cli
from tulu.data import epoch_permutation, step_samples
from tulu.dist import all_reduce, broadcast_object, entrypoint, init_dist, print0, shutdown
from tulu.fsdp import reshard, resolve_compute_dtype
from tulu.metrics import Metrics, mfu, model_flops_per_token, peak_flops, start_tracker
from tulu.mixer import parse_mixer
from tulu.model import build_model, load_tokenizer
from tulu.optim import build_optimizer, build_scheduler
from tulu.resume import (StopRequest, find_resume_point, hold_output_dir, load_checkpoint, restore_scheduler,
                         save_checkpoint)
from tulu.reward import score_head_init
from tulu.rl_algorithms import ALGORITHMS, LossConfig, informative_groups, overlong_penalty, rollout_advantages
from tulu.rl_losses import kl_penalty, ppo_value_loss, rlvr_scores, rollout_metrics
from tulu.rollout_correction import rollout_correction
from tulu.rollouts import (INVALID_LOGPROB, build_prompt_data, check_engines_in_sync, engine_sync_gaps, generate,
                           held_out_correct_rate, response_logprobs, response_values, rollout_batch, sequence_scores)
from tulu.verifiers import verify_batch


@dataclasses.dataclass
class Args(LogArgs, PlanArgs):
    # --- data
    dataset_mixer: str | None = None
    """Training prompts as a JSON dict {"name": frac_or_count} (rows: messages, ground_truth, dataset)."""
    dataset_mixer_list: list[str] | None = None
    """Training prompts as `name frac_or_count ...`. Neither given: the embedded tulu/synth-rlvr."""
    dataset_train_splits: list[str] = dataclasses.field(default_factory=lambda: ["train"])
    """Split of each training dataset (hub datasets)."""
    dataset_eval_mixer: str | None = None
    """Held-out prompts (JSON dict). Default with the embedded data: tulu/synth-rlvr-eval (200 rows)."""
    dataset_eval_splits: list[str] = dataclasses.field(default_factory=lambda: ["train"])
    """Split of each eval dataset."""
    max_token_length: int | None = None
    """Drop rows whose full chat (prompt + reference answer) is longer than this. None: no limit (the
    original's default; Tulu 3: 2048; the tiny preset: 512)."""
    max_prompt_token_length: int | None = None
    """Drop rows whose prompt is longer than this. None: no limit (the original's default; Tulu 3: 2048;
    the tiny preset: 256)."""
    response_length: int = 53
    """Tokens generated per response, the response tensor width (the original's default; Tulu 3: 2048;
    the tiny preset: 24)."""
    chat_template: str = "tulu"
    """Chat template name (Tulu 3's value; the original's default simple_chat)."""
    sft_messages_key: str = "messages"
    """Column holding the prompt messages."""
    ground_truths_key: str = "ground_truth"
    """Column holding the ground truth the verifier checks against."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping with an error naming the row and field."""
    # --- models
    model_name_or_path: str = "tulu/tiny"
    """Policy (and reference) initialization: in Tulu 3 the DPO model."""
    model_revision: str | None = None
    """Hub revision of the policy."""
    reward_model_path: str | None = None
    """Reward model (loaded only when reward_model_multiplier != 0) and default value-model init."""
    value_model_path: str | None = None
    """Value model initialization (default: reward_model_path; else the policy with a fresh head)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing for the policy and value model."""
    cpu_offload: bool = False
    """Offload parameters, gradients and optimizer state of the trained models to the host."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype (auto = bf16 on GPU, fp32 on CPU); master weights and optimizer stay fp32."""
    # --- generation
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
    temperature: float = 1.0
    """Sampling temperature (the learner divides logits by temperature + 1e-7, as the original). Tulu 3's
    value; the original's default was 0.7."""
    eval_temperature: float = 0.0
    """Temperature of the held-out evaluation (0 = greedy)."""
    stop_token: Literal["eos", "period"] = "eos"
    """The token a response must end with (else non_stop_penalty). period: a response ends at its first '.'
    token, or at EOS (which then draws the penalty), as the original's EOS-stopped, '.'-truncated output.
    Tulu 3's value (the original's default None stopped nowhere)."""
    # --- rewards
    apply_verifiable_reward: bool = True
    """Add verification_reward · verified (GSM8K / MATH / IFEval checkers by the row's dataset). Tulu 3's
    value (the original's default False)."""
    verification_reward: float = 10.0
    """Reward for a verified answer."""
    reward_model_multiplier: float = 0.0
    """Weight of the reward model's score (0: the RM is never built or run). Tulu 3's value (the
    original's default 1.0)."""
    non_stop_penalty: bool = True
    """Replace the score of a response that never emitted the stop token by penalty_reward_value. Tulu 3's
    value (the original's default False)."""
    penalty_reward_value: float = -10.0
    """Score of a response without the stop token (with non_stop_penalty). Tulu 3's value (the original's
    default -1.0)."""
    min_response_length: int = 0
    """A stopped response shorter than this also gets the penalty (original's contain_stop rule)."""
    # --- RL
    algo: Literal["ppo", "grpo", "dr_grpo", "dapo", "gspo"] = "ppo"
    """ppo: value model, GAE, KL in the reward (Tulu 3). grpo: group-normalized advantages, KL in the loss.
    dr_grpo: no std division, token sums over a constant (Liu et al. 2025). dapo: clip-higher, a token
    mean over the global mini-batch, overlong shaping, groups of equal correctness dropped (Yu et al.
    2025). gspo: a clipped sequence-level ratio (Zheng et al. 2025). Table: tulu/rl_algorithms.py."""
    beta: float = 0.05
    """KL coefficient against the reference (initial) policy."""
    kl_estimator: Literal["auto", "kl1", "kl2", "kl3"] = "auto"
    """kl1 = logp − ref, kl2 = ½·kl1², kl3 = exp(−kl1) − 1 + kl1. auto: kl1 for ppo (in the reward, as
    Tulu 3), kl3 for grpo (in the loss: kl1's gradient there just lowers every sampled token's log-prob)."""
    cliprange: float | None = None
    """Ratio clip ε (the lower one, 1 − ε, with cliprange_high). Default: the algorithm's: 0.2 (the
    original's; DAPO's ε_low), gspo 3e-4 (the GSPO paper's)."""
    cliprange_high: float | None = None
    """Upper ratio clip 1 + ε_high. Default: cliprange; dapo 0.28, gspo 4e-4 (their papers')."""
    overlong_buffer_len: int | None = None
    """DAPO's soft overlong punishment: the score falls linearly by up to overlong_penalty_factor over
    the last N response tokens. Default: dapo response_length // 5 (DAPO's 4096 of 20480), else 0 (off)."""
    overlong_penalty_factor: float = 1.0
    """Largest overlong penalty (DAPO's 1, on its ±1 rewards; ours are verification_reward = 10)."""
    dynamic_sampling: bool | None = None
    """Drop prompts whose samples are all verified or all not (no signal) from the loss. DAPO resamples
    to refill the batch; here the step trains on the rest. Default: on for dapo."""
    cliprange_value: float = 0.2
    """Value clip."""
    vf_coef: float = 0.1
    """Value loss weight."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (mean kept) before GAE."""
    grpo_loss_normalization: Literal["token", "sequence"] = "token"
    """GRPO: mean over the micro-batch's tokens, or per-sequence means (see Dr. GRPO, Liu et al. 2025)."""
    rollout_correction: Literal["none", "tis", "mis", "icepop"] = "none"
    """Importance weights for the engine's samples (tulu/rollout_correction.py): none (Tulu 3), tis
    (truncated, Yao et al. 2025), mis (masked: out-of-band tokens leave the loss), icepop (Ling team 2025)."""
    rollout_correction_level: Literal["token", "sequence"] = "token"
    """Per-token ratios, or each response's product of them on all its tokens."""
    rollout_correction_cap: float = 2.0
    """tis: the weight min(ρ, cap) (open-instruct's rho correction clamps at 2)."""
    rollout_correction_band: tuple[float, float] = (0.5, 2.0)
    """mis / icepop: tokens whose ratio π_old/π_engine is outside [low, high] are masked."""
    use_vllm_logprobs: bool = False
    """Use the engine's log-probs as π_old instead of recomputing them (one forward fewer per step)."""
    chunked_lm_head: bool = True
    """Response log-probs through the LM head a chunk of tokens at a time, recomputed in backward
    (tulu/lm_head.py): the (tokens, vocab) logits are never built. False: the model's full logits."""
    # --- optimization
    learning_rate: float = 2e-5
    """AdamW learning rate of the policy and the value model (the original's default; Tulu 3 8B: 3e-7;
    the tiny preset: 3e-4)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming up."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Schedule over all optimizer steps."""
    weight_decay: float = 0.01
    """AdamW weight decay (the original used torch's default 0.01)."""
    clip_grad_norm: float = 1.0
    """Gradient-norm clip (the original's DeepSpeed config: 1.0)."""
    total_episodes: int = 100000
    """Responses to train on; training steps = total_episodes // (rollout prompts per step · samples)
    (the original's default; the tiny preset: 12800)."""
    local_rollout_batch_size: int = 64
    """Prompts per rank per training step (the original's default)."""
    number_samples_per_prompt: int = 1
    """Responses sampled per prompt (the original's default; grpo needs >= 2, e.g. 4)."""
    local_mini_batch_size: int = 64
    """Responses per rank per optimizer step (must divide local_rollout_batch_size · samples)."""
    per_device_train_batch_size: int = 1
    """Responses per micro-batch in the update (gradient accumulation = mini / this; the original's
    default; the tiny preset: 16)."""
    local_rollout_forward_batch_size: int = 64
    """Responses per micro-batch in the no-grad scoring forwards (the original's default; tiny: 32)."""
    num_epochs: int = 4
    """PPO epochs over each rollout batch (the original's default; the tiny preset: 1)."""
    num_mini_batches: int | None = None
    """Optional check: must equal local_rollout_batch_size · samples / local_mini_batch_size."""
    num_evals: int = 4
    """Held-out evaluations during training (plus one before the first step); 0 disables them."""
    save_freq: int = -1
    """Save a resumable checkpoint every N training steps (-1: only on a stop request)."""
    keep_last_n_checkpoints: int = 3
    """Complete checkpoints kept."""
    resume_from_checkpoint: str | None = "auto"
    """A checkpoint folder, or auto: the newest complete one under output_dir."""
    seed: int = 1
    """Seed of the prompt order, the sampling and every learner RNG."""


def load_mixer(json_form: str | None, list_form: list[str] | None, default: dict) -> dict:
    return parse_mixer(list_form, json_form) if (json_form or list_form) else default


def plan(args: Args, train_mix: dict) -> None:
    """--dry_run: the schedule and per-rank memory of every model at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan

    world = default_world(args.preset, args.dry_run_world_size)
    n = args.number_samples_per_prompt
    prompts = args.local_rollout_batch_size * world
    steps = args.total_episodes // (prompts * n)
    minibatches = args.local_rollout_batch_size * n // args.local_mini_batch_size
    rows = count_rows(train_mix, args.dataset_train_splits[0])
    lines = [("prompts / step", f"{prompts} ({args.local_rollout_batch_size} x {world} ranks) x {n} samples"),
             ("training steps", steps), ("optimizer steps", f"{steps * args.num_epochs * minibatches} "
                                                         f"({args.num_epochs} epochs x {minibatches} minibatches)"),
             ("warmup steps", int(steps * args.num_epochs * minibatches * args.warmup_ratio)),
             ("gradient accumulation", args.local_mini_batch_size // args.per_device_train_batch_size),
             ("tokens / step (at most)", prompts * n * (args.max_prompt_token_length or 0) + prompts * n * args.response_length),
             ("prompt rows", rows if rows is not None else "not loadable here"),
             ("engines", f"{args.vllm_num_engines} x TP {args.vllm_tensor_parallel_size} ({args.engine}), "
                         f"async={args.async_mode}")]
    models = {"policy": (args.model_name_or_path, "causal_lm", True)}
    if args.beta > 0:
        models["reference (frozen)"] = (args.model_name_or_path, "causal_lm", False)
    if ALGORITHMS[args.algo].value_model:
        models["value"] = (args.value_model_path or args.reward_model_path or args.model_name_or_path, "reward", True)
    if args.reward_model_multiplier != 0:
        models["reward model (frozen)"] = (args.reward_model_path, "reward", False)
    length = args.max_prompt_token_length and args.max_prompt_token_length + args.response_length
    step = StepPlan(length and args.per_device_train_batch_size * length,
                    forward_tokens=length and args.local_rollout_forward_batch_size * length,
                    checkpointing=args.gradient_checkpointing, chunked=args.chunked_lm_head,
                    mixed_precision=args.mixed_precision,
                    engine=length and (prompts * n // args.vllm_num_engines, length, args.vllm_tensor_parallel_size))
    print_plan(f"rlvr ({args.algo})", world=world, preset=args.preset, cpu_offload=args.cpu_offload,
               lines=lines, models=models, step=step)


@entrypoint  # one rank's crash: its traceback shown once, every rank stopped
def main(args: Args) -> None:
    train_mix = load_mixer(args.dataset_mixer, args.dataset_mixer_list, {"tulu/synth-rlvr": 1.0})
    if args.dry_run:
        return plan(args, train_mix)
    d = init_dist()
    hold_output_dir(args.output_dir, d.is_main)  # one writer per output_dir (flock; names the holder)
    stop = StopRequest()
    torch.manual_seed(args.seed + d.rank)  # the original seeded learner RNGs with the rank
    compute_dtype = resolve_compute_dtype(args.mixed_precision, d.device)
    n = args.number_samples_per_prompt
    algo = ALGORITHMS[args.algo]
    kl_estimator = args.kl_estimator if args.kl_estimator != "auto" else ("kl1" if algo.kl_in_reward else "kl3")
    eps_low = algo.clip[0] if args.cliprange is None else args.cliprange
    eps_high = args.cliprange_high if args.cliprange_high is not None else (
        algo.clip[1] if args.cliprange is None else eps_low)
    loss_cfg = LossConfig(eps_low, eps_high, args.beta, kl_estimator, args.grpo_loss_normalization, args.response_length)
    overlong = args.overlong_buffer_len if args.overlong_buffer_len is not None else (
        args.response_length // 5 if algo.overlong_shaping else 0)
    dynamic_sampling = algo.dynamic_sampling if args.dynamic_sampling is None else args.dynamic_sampling
    local_responses = args.local_rollout_batch_size * n
    if local_responses % args.local_mini_batch_size or args.local_mini_batch_size % args.per_device_train_batch_size:
        raise ValueError("local_rollout_batch_size·number_samples_per_prompt must be a multiple of local_mini_batch_size, "
                         "and local_mini_batch_size a multiple of per_device_train_batch_size")
    num_mini_batches = local_responses // args.local_mini_batch_size
    if args.num_mini_batches not in (None, num_mini_batches):
        raise ValueError(f"--num_mini_batches {args.num_mini_batches} != derived {num_mini_batches}")
    grad_accum = args.local_mini_batch_size // args.per_device_train_batch_size
    if algo.advantages != "gae" and n < 2:
        raise ValueError(f"{args.algo} needs --number_samples_per_prompt >= 2 (advantages are taken within a group)")
    if not 0 <= overlong < args.response_length:
        raise ValueError(f"--overlong_buffer_len {overlong} must be in [0, --response_length {args.response_length})")
    if args.use_vllm_logprobs and args.rollout_correction != "none":
        raise ValueError("--rollout_correction needs the trainer's own π_old: with --use_vllm_logprobs the PPO "
                         "ratio is already taken against the engine's log-probs")
    try:  # the engines' limits, checked before anything starts
        SamplingParams(n=n, temperature=args.temperature, max_tokens=args.response_length)
        SamplingParams(n=1, temperature=args.eval_temperature, max_tokens=args.response_length)
    except ValueError as e:
        raise ValueError(f"--number_samples_per_prompt / --temperature / --eval_temperature / --response_length: {e}")

    # ---- data
    tokenizer = load_tokenizer(args.model_name_or_path, args.model_revision, args.chat_template)
    stop_id = tokenizer.eos_token_id if args.stop_token == "eos" else tokenizer.encode(".", add_special_tokens=False)[0]
    # Engines stop at EOS in both modes (the original's vLLM did), and at the first stop_id: the same
    # response as the original's generate-to-EOS-then-truncate-after-the-first-stop_id.
    stop_ids = tuple(dict.fromkeys((stop_id, tokenizer.eos_token_id)))
    embedded = not (args.dataset_mixer or args.dataset_mixer_list)
    eval_mix = load_mixer(args.dataset_eval_mixer, None, {"tulu/synth-rlvr-eval": 200} if embedded else {})
    build = lambda mix, split: build_prompt_data(mix, tokenizer, split, args.max_prompt_token_length,  # noqa: E731
                                                 args.max_token_length, args.sft_messages_key,
                                                 args.ground_truths_key, args.skip_bad_rows, d.is_main)
    data = build(train_mix, args.dataset_train_splits[0])
    eval_data = build(eval_mix, args.dataset_eval_splits[0]) if eval_mix and args.num_evals > 0 else None

    # ---- models: policy (trained), reference (frozen), value (PPO), reward model (only if weighted)
    common = dict(compute_dtype=compute_dtype, cpu_offload=args.cpu_offload, seed=args.seed)
    policy = build_model(args.model_name_or_path, d.device, revision=args.model_revision,
                         gradient_checkpointing=args.gradient_checkpointing, **common)
    ref = (build_model(args.model_name_or_path, d.device, revision=args.model_revision, frozen=True, **common)
           if args.beta > 0 else None)
    value = None
    if algo.value_model:
        value_path = args.value_model_path or args.reward_model_path or args.model_name_or_path
        value = build_model(value_path, d.device, kind="reward", gradient_checkpointing=args.gradient_checkpointing,
                            init_missing=score_head_init(args.seed), **common)
    reward_model = None
    if args.reward_model_multiplier != 0:
        if not args.reward_model_path:
            raise ValueError("--reward_model_multiplier != 0 needs --reward_model_path")
        reward_model = build_model(args.reward_model_path, d.device, kind="reward", frozen=True, **common)
    trained = {"policy": policy} | ({"value": value} if value is not None else {})
    optimizers = {k: build_optimizer(m, args.learning_rate, args.weight_decay) for k, m in trained.items()}

    rollout_batch_size = args.local_rollout_batch_size * d.world  # prompts per step, all ranks
    total_steps = args.total_episodes // (rollout_batch_size * n)
    steps_per_epoch = max(1, len(data) // rollout_batch_size)
    opt_steps = total_steps * args.num_epochs * num_mini_batches
    schedulers = {k: build_scheduler(o, opt_steps, int(opt_steps * args.warmup_ratio), args.lr_scheduler_type)
                  for k, o in optimizers.items()}
    eval_freq = max(1, total_steps // max(1, args.num_evals))
    eval_params = SamplingParams(n=1, temperature=args.eval_temperature, max_tokens=args.response_length,
                                 stop_token_ids=stop_ids, stop_at_eos=True, seed=args.seed)

    start_step = 0
    resume = find_resume_point(args.output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = load_checkpoint(resume, {k: (m, optimizers[k]) for k, m in trained.items()}, d.rank, d.world)
        start_step = state["samples_seen"] // rollout_batch_size
        for s in schedulers.values():
            restore_scheduler(s, start_step * args.num_epochs * num_mini_batches)

    # ---- engines (rank 0 owns the pool; every rank joins the weight sync: gathering is collective)
    engine = args.engine if args.engine != "auto" else ("vllm" if torch.cuda.is_available() else "torch")
    # CPU engines get the cores the trainer ranks leave (at least one thread each): oversubscribed
    # torch threads spin-wait, measured here at 75x slower generation (25.7 s vs 0.34 s).
    threads = max(1, ((os.cpu_count() or 1) - d.world) // args.vllm_num_engines)
    # vLLM as the original's: seed, max_model_len = prompt + response (vllm_utils2.py)
    engine_args = serve_args(engine, args.engine_dtype, args.seed, args.max_prompt_token_length and
                             args.max_prompt_token_length + args.response_length, args.vllm_gpu_memory_utilization,
                             args.vllm_kv_cache_gib, args.vllm_enforce_eager)
    pool = EnginePool.start(args.model_name_or_path, args.vllm_num_engines, engine=engine, threads=threads,
                            gpus_per_engine=args.vllm_tensor_parallel_size, engine_args=engine_args,
                            trainer_gpus=d.local_world if d.device.type == "cuda" else 0,
                            log_dir=f"{args.output_dir}/engine_logs",
                            timeout_s=args.engine_timeout_s) if d.is_main else None
    sync = WeightSync(pool, log=False)  # sends in the engines' dtype: bf16 to vLLM, fp32 to a CPU TorchEngine
    sync.push(policy, version=start_step)
    check_every = args.sync_check_steps if args.sync_check_steps is not None else (0 if args.async_mode else 1)
    check_tol = args.sync_check_tol or (1e-3 if sync.dtype in (None, torch.float32) else 0.1)
    probe = [data.ds[i]["input_ids"] for i in range(min(4, len(data)))]  # a fixed batch, every check
    probe_params = SamplingParams(n=1, temperature=args.temperature, max_tokens=min(16, args.response_length),
                                  stop_token_ids=stop_ids, stop_at_eos=True, seed=args.seed)
    chunked = args.chunked_lm_head  # every learner-side log-prob: old, reference, new, the sync probe
    metrics = Metrics(args.output_dir, d.is_main, d.device, start_tracker(args, dataclasses.asdict(args)))
    print0(f"[rlvr] {args.algo}: {len(data)} prompts, {total_steps} steps of {rollout_batch_size} prompts x {n} "
           f"samples, {num_mini_batches} minibatch(es) x {grad_accum} micro-batches x {args.num_epochs} epoch(s), "
           f"engine={engine}, async={args.async_mode}, world {d.world}")
    if eval_data is not None and start_step == 0:
        metrics.log(0, held_out_correct_rate(pool, d.is_main, eval_data, tokenizer, eval_params, args.output_dir, 0))

    epoch_perm = functools.lru_cache(maxsize=2)(lambda epoch: epoch_permutation(len(data), args.seed, epoch))

    def prompts_for(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        return step_samples(epoch_perm(epoch), k, rollout_batch_size)

    def launch(step: int):
        """Rank 0: start generating step `step`'s batch in the background (or run it now, in sync mode)."""
        params = SamplingParams(n=n, temperature=args.temperature, max_tokens=args.response_length,
                                stop_token_ids=stop_ids, stop_at_eos=True, seed=args.seed * 1_000_003 + step)
        prompts = [data.ds[i]["input_ids"] for i in prompts_for(step)]
        return executor.submit(generate, pool, prompts, params)

    executor = ThreadPoolExecutor(max_workers=1) if d.is_main else None
    peak = peak_flops(d.device)
    pending = launch(start_step) if d.is_main and args.async_mode else None
    stopped = False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc=f"rlvr-{args.algo}",
                     initial=start_step, total=total_steps, mininterval=5):
        t_step = time.perf_counter()
        # ---- 1. this step's rollouts: generated by the previous policy (async) or the current one (sync)
        gen_s, groups = 0.0, None
        current = (pending if args.async_mode else launch(step)) if d.is_main else None
        # Every rank waits in short polls, not in broadcast_object below: a generation may take longer
        # than the default group's timeout. A hung engine fails `current` after engine_timeout_s.
        wait_together(lambda: current is not None and not current.done(), 2 * args.engine_timeout_s, "generation")
        if d.is_main:
            groups, gen_s = current.result()
            if args.async_mode and step + 1 < total_steps:
                pending = launch(step + 1)  # overlaps everything below until the next weight push
        t_wait = time.perf_counter() - t_step
        groups = broadcast_object(groups)
        ids = prompts_for(step)[d.rank * args.local_rollout_batch_size:(d.rank + 1) * args.local_rollout_batch_size]
        rows = [data.ds[i] for i in ids]
        mine = groups[d.rank * args.local_rollout_batch_size:(d.rank + 1) * args.local_rollout_batch_size]
        queries = [r["input_ids"] for r in rows for _ in range(n)]
        responses = [c[0] for g in mine for c in g]
        engine_lp = torch.zeros(len(responses), args.response_length)  # (B, R): what the engine sampled with
        for b, c in enumerate(c for g in mine for c in g):
            engine_lp[b, :len(c[1][:args.response_length])] = torch.tensor(c[1][:args.response_length])
        batch = rollout_batch(queries, responses, tokenizer.pad_token_id, args.response_length)
        B, R = len(queries), args.response_length
        resp_mask = batch["response_mask"].to(d.device)  # (B, R)
        seq_lens = batch["seq_lens"].to(d.device)  # (B,)

        # ---- 2. score: old/ref log-probs, values, RM, verifiers (no grad)
        t_score = time.perf_counter()
        with torch.no_grad():
            chunks = [slice(i, i + args.local_rollout_forward_batch_size) for i in range(0, B, args.local_rollout_forward_batch_size)]
            engine_lp = engine_lp.to(d.device).masked_fill(~resp_mask, INVALID_LOGPROB)  # (B, R)
            old_lp = engine_lp if args.use_vllm_logprobs else torch.cat(
                [response_logprobs(policy, batch, c, d.device, args.temperature, chunked) for c in chunks])  # (B, R)
            ref_lp = torch.cat([response_logprobs(ref, batch, c, d.device, args.temperature, chunked)
                                for c in chunks]) if ref is not None else old_lp
            old_values = torch.cat([response_values(value, batch, c, d.device) for c in chunks]) if value is not None else None
            rm = torch.cat([sequence_scores(reward_model, batch, c, d.device) for c in chunks]) if reward_model is not None else None
        for m in (policy, ref, value, reward_model):
            if m is not None:
                reshard(m)  # a no-grad forward leaves FSDP units (root, lm_head) gathered
        texts = tokenizer.batch_decode([r[:R] for r in responses], skip_special_tokens=True)
        sources = [r["source"] for r in rows for _ in range(n)]
        truths = [r["ground_truth"] for r in rows for _ in range(n)]
        verified = torch.tensor(verify_batch(sources, texts, truths) if args.apply_verifiable_reward else [0.0] * B,
                                device=d.device)  # (B,)
        responses_t = batch["query_response"][:, batch["context_length"]:].to(d.device)  # (B, R)
        scores = rlvr_scores(rm, verified, responses_t, seq_lens, stop_id, args.reward_model_multiplier,
                             args.verification_reward, args.non_stop_penalty, args.penalty_reward_value,
                             args.min_response_length)  # (B,)
        if overlong:  # DAPO's length shaping, on the score
            scores = scores + overlong_penalty(seq_lens + 1, R, overlong, args.overlong_penalty_factor)  # (B,)
        kl = kl_penalty(old_lp, ref_lp, kl_estimator).masked_fill(~resp_mask, 0.0)  # (B, R)
        # Off-policy correction for the engine's samples: weights on the surrogate, and the loss mask
        # (mis drops out-of-band tokens from the loss and its token count).
        is_weights, loss_mask, corr = rollout_correction(old_lp, engine_lp, resp_mask, args.rollout_correction,
                                                         args.rollout_correction_level, args.rollout_correction_cap,
                                                         args.rollout_correction_band)  # (B, R), (B, R)
        if dynamic_sampling:  # groups of one verdict carry no signal: out of the loss and its token count
            informative = informative_groups(verified, n)  # (B,)
            loss_mask = loss_mask & informative[:, None]
            corr["val/informative_frac"] = informative.float().mean()

        # ---- 3. advantages (and, for ppo, returns and the value mask), by the algorithm's estimator
        advantages, returns, value_mask, non_score = rollout_advantages(
            algo, scores, kl, old_values, seq_lens, resp_mask, n, args.beta, args.gamma, args.lam,
            args.whiten_rewards, all_reduce)
        t_score = time.perf_counter() - t_score

        # ---- 4. update: num_epochs passes over num_mini_batches minibatches
        t_train = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed * 7919 + step * 131 + d.rank)
        for _ in range(args.num_epochs):
            order = torch.randperm(B, generator=g)
            for mb in order.split(args.local_mini_batch_size):
                cfg, divisor = loss_cfg, grad_accum  # per-micro-batch means, averaged (as the original)
                if algo.global_token_mean:  # Σ over every token of the mini-batch on all ranks / their count
                    tokens = all_reduce(loss_mask[mb].sum().float())  # ranks' gradients are averaged
                    cfg, divisor = dataclasses.replace(loss_cfg, global_tokens=tokens.clamp(min=1) / d.world), 1
                for micro in mb.split(args.per_device_train_batch_size):
                    new_lp = response_logprobs(policy, batch, micro, d.device, args.temperature, chunked)  # (b, R)
                    pg_loss, pm = algo.policy_loss(new_lp, old_lp[micro], ref_lp[micro], advantages[micro],
                                                   loss_mask[micro], cfg, is_weights[micro])
                    (pg_loss / divisor).backward()
                    for k, v in pm.items():
                        metrics.add(k, v)
                    if value is not None:
                        vpred = response_values(value, batch, micro, d.device)  # (b, R)
                        vf_loss, vm = ppo_value_loss(vpred, old_values[micro], returns[micro], value_mask[micro],
                                                     args.cliprange_value)
                        (args.vf_coef * vf_loss / grad_accum).backward()
                        for k, v in vm.items():
                            metrics.add(k, v)
                for k, model in trained.items():
                    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                    metrics.add(f"{k}/grad_norm", gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                    optimizers[k].step()
                    schedulers[k].step()
                    optimizers[k].zero_grad(set_to_none=True)
        t_train = time.perf_counter() - t_train

        # ---- 5. new weights to the engines (waits for the background generation to finish first,
        # every rank in short polls, so it may outlast any collective timeout; see rollout/weight_sync.py)
        t_sync = time.perf_counter()
        sync.push(policy, version=step + 1)
        if check_every and (step + 1) % check_every == 0:  # the engines now hold the trainer's weights
            gaps = engine_sync_gaps(pool, d.is_main, policy, probe, probe_params, tokenizer.pad_token_id, d.device,
                                    args.temperature, chunked)
            check_engines_in_sync(gaps, check_tol, step + 1)  # raises, naming the engines, the gap and the step
            metrics.add("debug/sync_check_gap", max(gaps.values()))
        t_sync = time.perf_counter() - t_sync

        # ---- 6. metrics, eval, checkpoint
        stop_flag = all_reduce(torch.tensor(float(stop.requested), device=d.device))
        for k, v in (rollout_metrics(old_lp, engine_lp, resp_mask, kl, scores, verified, non_score, seq_lens,
                                     responses_t == stop_id) | corr).items():
            metrics.add(k, v)
        step_s = time.perf_counter() - t_step
        extra = {"episode": (step + 1) * rollout_batch_size * n, "lr": schedulers["policy"].get_last_lr()[0],
                 "time/step": step_s, "time/generation": gen_s, "time/wait_for_generation": t_wait,
                 "time/scoring": t_score, "time/training": t_train, "time/weight_sync": t_sync,
                 # async: generation ran beside scoring+training; the overlap is what was hidden
                 "time/overlap": max(0.0, gen_s - t_wait) if args.async_mode else 0.0}
        # MFU of this trainer device over the whole step: trained models ran forward+backward num_epochs
        # times, and every model scored the batch once (generation runs on the engines, not counted).
        L, tokens = batch["query_response"].shape[1], int(batch["attention_mask"].sum())
        metrics.add("perf/batch_tokens", tokens)  # this rank's non-pad tokens (prompt + response), mean over ranks
        extra.update(mfu([(tokens * args.num_epochs, model_flops_per_token(m, L)) for m in trained.values()],
                         [(tokens, model_flops_per_token(m, L)) for m in (policy, ref, value, reward_model) if m is not None],
                         step_s, peak))
        extra = broadcast_object(extra)
        if (step + 1) % eval_freq == 0 or step + 1 == total_steps:
            if eval_data is not None:
                extra.update(held_out_correct_rate(pool, d.is_main, eval_data, tokenizer, eval_params, args.output_dir,
                                                   step + 1))
        out = metrics.log(step + 1, extra)
        if d.is_main and ((step + 1) % 5 == 0 or step == start_step):
            tqdm.write(f"step {step + 1}/{total_steps} score {out['objective/scores']:.2f} "
                       f"correct {out['objective/verifiable_correct_rate']:.3f} kl {out['objective/kl']:.3f}"
                       + (f" eval {out['eval/verifiable_correct_rate']:.3f}" if "eval/verifiable_correct_rate" in out else ""))
        stopping = bool(stop_flag > 0)
        if stopping or (args.save_freq > 0 and (step + 1) % args.save_freq == 0):
            save_checkpoint(args.output_dir, step + 1, {k: (m, optimizers[k]) for k, m in trained.items()},
                            {"samples_seen": (step + 1) * rollout_batch_size, "episode": extra["episode"]},
                            d.rank, d.world, args.keep_last_n_checkpoints)
        if stopping:
            stopped = True
            print0(f"[rlvr] stopped by signal after step {step + 1}; rerun the same command to resume")
            break

    if d.is_main:  # a pending generation (stop requested) is cancelled or waited for
        executor.shutdown(wait=True, cancel_futures=True)
    if not stopped:
        export_hf(policy, tokenizer, args.output_dir, d.is_main)
        print0(f"[rlvr] saved the policy to {args.output_dir}")
    sync.close()
    if pool is not None:
        pool.shutdown()
    del policy, ref, value, reward_model, optimizers, trained
    shutdown()


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
