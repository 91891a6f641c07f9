"""RL with verifiable rewards (Tulu 3 stage 4): PPO exactly as the original, GRPO, and the variants
Dr. GRPO, DAPO and GSPO (--algo; one row each in tulu/rl_algorithms.py).

Generation runs in a pool of engine processes (rollout/: vLLM on GPUs, TorchEngine on CPU) that get
the new weights after every step through their own process group. --async_mode (default, as the
original) generates the next batch while this one trains: one step off-policy.

Embedded default (CPU): the tiny model on synthetic arithmetic prompts, verified with the GSM8K rule.
    torchrun --standalone --nproc_per_node 2 train/rlvr.py --model_name_or_path output/demo/sft
GRPO normalizes within each prompt's group of samples, so it needs several
(the default is 1, as the original):
    torchrun --standalone --nproc_per_node 2 train/rlvr.py --model_name_or_path output/demo/sft --algo grpo \
      --number_samples_per_prompt 4 --local_rollout_batch_size 16

Tulu 3 8B RLVR (open-instruct docs/tulu3.md; 7 learner GPUs + 1 vLLM GPU):
    torchrun --nproc_per_node 7 train/rlvr.py \
      --dataset_mixer '{"allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": 1.0}' --dataset_train_splits train \
      --dataset_eval_mixer '{"allenai/RLVR-GSM-MATH-IF-Mixed-Constraints": 128}' --dataset_eval_splits train \
      --max_token_length 2048 --max_prompt_token_length 2048 --response_length 2048 \
      --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-DPO \
      --reward_model_path allenai/Llama-3.1-Tulu-3-8B-RM --non_stop_penalty --stop_token eos \
      --temperature 1.0 --ground_truths_key ground_truth --chat_template tulu --sft_messages_key messages \
      --learning_rate 3e-7 --total_episodes 10000000 --penalty_reward_value -10.0 \
      --per_device_train_batch_size 2 --local_rollout_forward_batch_size 2 --local_mini_batch_size 32 \
      --local_rollout_batch_size 32 --num_epochs 4 --beta 0.05 --apply_verifiable_reward true \
      --reward_model_multiplier 0.0 --num_evals 3 --save_freq 100 --seed 3 --gradient_checkpointing \
      --with_tracking
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
from rollout.groups import wait_together
from rollout.pool import EnginePool
from rollout.serve import serve_args
from rollout.weight_sync import WeightSync
from tulu.checkpoint import maybe_resume, maybe_save
from tulu.config import CheckpointArgs, EngineArgs, LogArgs, PlanArgs, cli
from tulu.data import epoch_permutation, step_samples
from tulu.dist import all_reduce, broadcast_object, entrypoint, print0, shutdown
from tulu.export import export_hf
from tulu.loop import clip_and_step, finish, start_run
from tulu.losses import micro_batch_weight
from tulu.metrics import Metrics, mfu, model_flops_per_token, peak_flops, start_tracker
from tulu.mixer import parse_mixer, training_mixer
from tulu.model import build_model, load_tokenizer
from tulu.optim import build_optimizer, build_scheduler
from tulu.reward import score_head_init
from tulu.rl_algorithms import (ALGORITHMS, AlgorithmArgs, LossConfig, RewardArgs, informative_groups,
                                overlong_penalty, rollout_advantages)
from tulu.rl_batch import (INVALID_LOGPROB, build_prompt_data, check_engines_in_sync, engine_logprobs,
                           engine_sync_gaps, generate, held_out_correct_rate, response_logprobs,
                           response_values, rollout_batch, score_rollouts, verify_rollouts)
from tulu.rl_losses import kl_penalty, ppo_value_loss, rollout_metrics
from tulu.rollout_correction import rollout_correction


@dataclasses.dataclass
class Args(AlgorithmArgs, RewardArgs, EngineArgs, LogArgs, CheckpointArgs, PlanArgs):
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
    # --- generation (the engine pool's flags: tulu.config.EngineArgs)
    temperature: float = 1.0
    """Sampling temperature (the learner divides logits by temperature + 1e-7, as the original). Tulu 3's
    value; the original's default was 0.7."""
    eval_temperature: float = 0.0
    """Temperature of the held-out evaluation (0 = greedy)."""
    stop_token: Literal["eos", "period"] = "eos"
    """The token a response must end with (else non_stop_penalty). period: a response ends at its first '.'
    token, or at EOS (which then draws the penalty), as the original's EOS-stopped, '.'-truncated output.
    Tulu 3's value (the original's default None stopped nowhere)."""
    # --- rewards (the score a response gets: tulu.rl_algorithms.RewardArgs)
    # --- RL (the algorithm's flags: tulu.rl_algorithms.AlgorithmArgs)
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
    """Save a resumable checkpoint every N training steps (the original's name; --checkpointing_steps N
    says the same); -1: only on a stop request."""
    seed: int = 1
    """Seed of the prompt order, the sampling and every learner RNG."""

    # ---- derived values (properties: nothing is written back into the flags)
    def should_save(self, completed_steps: int, steps_per_epoch: int) -> bool:
        every = self.save_freq > 0 and completed_steps % self.save_freq == 0
        return every or super().should_save(completed_steps, steps_per_epoch)

    @property
    def mini_batches(self) -> int:
        """Optimizer steps per epoch over one rollout batch."""
        return self.local_rollout_batch_size * self.number_samples_per_prompt // self.local_mini_batch_size

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.local_mini_batch_size // self.per_device_train_batch_size

    def check(self) -> None:
        """Refuse flag combinations that cannot run, before anything starts."""
        local = self.local_rollout_batch_size * self.number_samples_per_prompt
        if (local % self.local_mini_batch_size
                or self.local_mini_batch_size % self.per_device_train_batch_size):
            raise ValueError("local_rollout_batch_size·number_samples_per_prompt must be a multiple of "
                             "local_mini_batch_size, and local_mini_batch_size a multiple of "
                             "per_device_train_batch_size")
        if self.num_mini_batches not in (None, self.mini_batches):
            raise ValueError(f"--num_mini_batches {self.num_mini_batches} != derived {self.mini_batches}")
        if ALGORITHMS[self.algo].advantages != "gae" and self.number_samples_per_prompt < 2:
            raise ValueError(f"{self.algo} needs --number_samples_per_prompt >= 2 "
                             f"(advantages are taken within a group)")
        if not 0 <= self.overlong < self.response_length:
            raise ValueError(f"--overlong_buffer_len {self.overlong} must be in [0, --response_length "
                             f"{self.response_length})")
        if self.use_vllm_logprobs and self.rollout_correction != "none":
            raise ValueError("--rollout_correction needs the trainer's own π_old: with --use_vllm_logprobs "
                             "the PPO ratio is already taken against the engine's log-probs")
        try:  # the engines' limits
            SamplingParams(n=self.number_samples_per_prompt, temperature=self.temperature,
                           max_tokens=self.response_length)
            SamplingParams(n=1, temperature=self.eval_temperature, max_tokens=self.response_length)
        except ValueError as e:
            raise ValueError(f"--number_samples_per_prompt / --temperature / --eval_temperature / "
                             f"--response_length: {e}")


def load_prompts(args: Args, tokenizer, d, train_mix: dict, embedded: bool):
    """(training prompts, held-out prompts or None): rows of input_ids (chat template + generation
    prompt), verifier source and ground truth, checked at load. The embedded default holds out 200."""
    build = functools.partial(build_prompt_data, tokenizer=tokenizer,
                              max_prompt_token_length=args.max_prompt_token_length,
                              max_token_length=args.max_token_length, messages_key=args.sft_messages_key,
                              ground_truths_key=args.ground_truths_key, skip_bad_rows=args.skip_bad_rows,
                              is_main=d.is_main)
    eval_mix = parse_mixer(mixer=args.dataset_eval_mixer) if args.dataset_eval_mixer else (
        {"tulu/synth-rlvr-eval": 200} if embedded else {})
    eval_data = (build(eval_mix, split=args.dataset_eval_splits[0])
                 if eval_mix and args.num_evals > 0 else None)
    return build(train_mix, split=args.dataset_train_splits[0]), eval_data


def plan(args: Args, train_mix: dict) -> None:
    """--dry_run: the schedule and per-rank memory of every model at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan

    world = default_world(args.preset, args.dry_run_world_size)
    n = args.number_samples_per_prompt
    prompts = args.local_rollout_batch_size * world
    steps = args.total_episodes // (prompts * n)
    minibatches = args.mini_batches
    rows = count_rows(train_mix, args.dataset_train_splits[0])
    lines = [("prompts / step", f"{prompts} ({args.local_rollout_batch_size} x {world} ranks) x {n} samples"),
             ("training steps", steps), ("optimizer steps", f"{steps * args.num_epochs * minibatches} "
                                                         f"({args.num_epochs} epochs x "
                                                         f"{minibatches} minibatches)"),
             ("warmup steps", int(steps * args.num_epochs * minibatches * args.warmup_ratio)),
             ("gradient accumulation", args.grad_accum),
             ("tokens / step (at most)", prompts * n * (args.max_prompt_token_length or 0)
              + prompts * n * args.response_length),
             ("prompt rows", rows if rows is not None else "not loadable here"),
             ("engines", f"{args.vllm_num_engines} x TP {args.vllm_tensor_parallel_size} ({args.engine}), "
                         f"async={args.async_mode}")]
    models = {"policy": (args.model_name_or_path, "causal_lm", True)}
    if args.beta > 0:
        models["reference (frozen)"] = (args.model_name_or_path, "causal_lm", False)
    if ALGORITHMS[args.algo].value_model:
        models["value"] = (args.value_model_path or args.reward_model_path or args.model_name_or_path,
                           "reward", True)
    if args.reward_model_multiplier != 0:
        models["reward model (frozen)"] = (args.reward_model_path, "reward", False)
    length = args.max_prompt_token_length and args.max_prompt_token_length + args.response_length
    step = StepPlan(length and args.per_device_train_batch_size * length,
                    forward_tokens=length and args.local_rollout_forward_batch_size * length,
                    checkpointing=args.gradient_checkpointing, chunked=args.chunked_lm_head,
                    mixed_precision=args.mixed_precision,
                    engine=length and (prompts * n // args.vllm_num_engines, length,
                                       args.vllm_tensor_parallel_size))
    print_plan(f"rlvr ({args.algo})", world=world, preset=args.preset, cpu_offload=args.cpu_offload,
               lines=lines, models=models, step=step)


def start_engines(args: Args, d, engine: str) -> EnginePool | None:
    """Rank 0 owns the engine pool (the other ranks get None)."""
    if not d.is_main:
        return None
    # CPU engines get the cores the trainer ranks leave (at least one thread each): oversubscribed
    # torch threads spin-wait, measured here at 75x slower generation (25.7 s vs 0.34 s).
    threads = max(1, ((os.cpu_count() or 1) - d.world) // args.vllm_num_engines)
    # vLLM as the original's: seed, max_model_len = prompt + response (vllm_utils2.py)
    max_len = args.max_prompt_token_length and args.max_prompt_token_length + args.response_length
    engine_args = serve_args(engine, args.engine_dtype, args.seed, max_len, args.vllm_gpu_memory_utilization,
                             args.vllm_kv_cache_gib, args.vllm_enforce_eager)
    return EnginePool.start(args.model_name_or_path, args.vllm_num_engines, engine=engine, threads=threads,
                            gpus_per_engine=args.vllm_tensor_parallel_size, engine_args=engine_args,
                            trainer_gpus=d.local_world if d.device.type == "cuda" else 0,
                            log_dir=f"{args.output_dir}/engine_logs", timeout_s=args.engine_timeout_s)


def build_models(args: Args, d, compute_dtype: str):
    """(policy, reference, value, reward model): the reference only with a KL term (beta > 0), the value
    model only for algorithms that train one, the reward model only when its score is weighted."""
    common = dict(compute_dtype=compute_dtype, cpu_offload=args.cpu_offload, seed=args.seed)
    policy = build_model(args.model_name_or_path, d.device, revision=args.model_revision,
                         gradient_checkpointing=args.gradient_checkpointing, **common)
    ref = (build_model(args.model_name_or_path, d.device, revision=args.model_revision, frozen=True, **common)
           if args.beta > 0 else None)
    value = None
    if ALGORITHMS[args.algo].value_model:
        value_path = args.value_model_path or args.reward_model_path or args.model_name_or_path
        value = build_model(value_path, d.device, kind="reward",
                            gradient_checkpointing=args.gradient_checkpointing,
                            init_missing=score_head_init(args.seed), **common)
    reward_model = None
    if args.reward_model_multiplier != 0:
        if not args.reward_model_path:
            raise ValueError("--reward_model_multiplier != 0 needs --reward_model_path")
        reward_model = build_model(args.reward_model_path, d.device, kind="reward", frozen=True, **common)
    return policy, ref, value, reward_model


@entrypoint  # one rank's crash: its traceback shown once, every rank stopped
def main(args: Args) -> None:
    train_mix, given = training_mixer(args.dataset_mixer_list, args.dataset_mixer, embedded="tulu/synth-rlvr")
    if args.dry_run:
        return plan(args, train_mix)
    args.check()
    # the process group, one writer per output_dir, SIGTERM as a stop request; the original seeded
    # learner RNGs with the rank
    d, stop, compute_dtype, _ = start_run(args, seed_per_rank=True)
    n, algo, grad_accum = args.number_samples_per_prompt, ALGORITHMS[args.algo], args.grad_accum
    loss_cfg = LossConfig(*args.clip, args.beta, args.kl, args.grpo_loss_normalization, args.response_length)

    # ---- data
    tokenizer = load_tokenizer(args.model_name_or_path, args.model_revision, args.chat_template)
    stop_id = (tokenizer.eos_token_id if args.stop_token == "eos"
               else tokenizer.encode(".", add_special_tokens=False)[0])
    # Engines stop at EOS in both modes (the original's vLLM did), and at the first stop_id: the same
    # response as the original's generate-to-EOS-then-truncate-after-the-first-stop_id.
    stop_ids = tuple(dict.fromkeys((stop_id, tokenizer.eos_token_id)))
    data, eval_data = load_prompts(args, tokenizer, d, train_mix, embedded=not given)

    # ---- models: policy (trained), reference (frozen), value (PPO), reward model (only if weighted)
    policy, ref, value, reward_model = build_models(args, d, compute_dtype)
    trained = {"policy": policy} | ({"value": value} if value is not None else {})
    optimizers = {k: build_optimizer(net, args.learning_rate, args.weight_decay)
                  for k, net in trained.items()}
    modules = {k: (net, optimizers[k]) for k, net in trained.items()}  # what a checkpoint holds

    rollout_batch_size = args.local_rollout_batch_size * d.world  # prompts per step, all ranks
    total_steps = args.total_episodes // (rollout_batch_size * n)
    steps_per_epoch = max(1, len(data) // rollout_batch_size)
    opt_per_step = args.num_epochs * args.mini_batches  # optimizer steps per training step
    schedulers = {k: build_scheduler(o, total_steps * opt_per_step,
                                     int(total_steps * opt_per_step * args.warmup_ratio),
                                     args.lr_scheduler_type) for k, o in optimizers.items()}
    start_step = maybe_resume(args, modules, list(schedulers.values()), rollout_batch_size, d, opt_per_step)
    eval_freq = max(1, total_steps // max(1, args.num_evals))
    eval_params = SamplingParams(n=1, temperature=args.eval_temperature, max_tokens=args.response_length,
                                 stop_token_ids=stop_ids, stop_at_eos=True, seed=args.seed)

    # ---- engines (rank 0 owns the pool; every rank joins the weight sync: gathering is collective)
    engine = args.engine if args.engine != "auto" else ("vllm" if torch.cuda.is_available() else "torch")
    pool = start_engines(args, d, engine)
    sync = WeightSync(pool, log=False)  # sends in the engines' dtype: bf16 to vLLM, fp32 to a CPU TorchEngine
    sync.push(policy, version=start_step)
    check_every = (args.sync_check_steps if args.sync_check_steps is not None
                   else (0 if args.async_mode else 1))
    check_tol = args.sync_check_tol or (1e-3 if sync.dtype in (None, torch.float32) else 0.1)
    probe = [data.ds[i]["input_ids"] for i in range(min(4, len(data)))]  # a fixed batch, every check
    probe_params = SamplingParams(n=1, temperature=args.temperature, max_tokens=min(16, args.response_length),
                                  stop_token_ids=stop_ids, stop_at_eos=True, seed=args.seed)
    chunked = args.chunked_lm_head  # every learner-side log-prob: old, reference, new, the sync probe
    metrics = Metrics(args.output_dir, d.is_main, d.device, start_tracker(args, dataclasses.asdict(args)))
    print0(f"[rlvr] {args.algo}: {len(data)} prompts, {total_steps} steps of {rollout_batch_size} prompts "
           f"x {n} samples, {args.mini_batches} minibatch(es) x {grad_accum} micro-batches "
           f"x {args.num_epochs} epoch(s), engine={engine}, async={args.async_mode}, world {d.world}")
    if eval_data is not None and start_step == 0:
        metrics.log(0, held_out_correct_rate(pool, d, eval_data, tokenizer, eval_params,
                                             args.output_dir, 0))

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
    stopping = False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc=f"rlvr-{args.algo}",
                     initial=start_step, total=total_steps, mininterval=5):
        t_step = time.perf_counter()
        # ---- 1. this step's rollouts: generated by the previous policy (async) or the current one (sync)
        gen_s, groups = 0.0, None
        current = (pending if args.async_mode else launch(step)) if d.is_main else None
        # Every rank waits in short polls, not in broadcast_object below: a generation may take longer
        # than the default group's timeout. A hung engine fails `current` after engine_timeout_s.
        wait_together(lambda: current is not None and not current.done(), 2 * args.engine_timeout_s,
                      "generation")
        if d.is_main:
            groups, gen_s = current.result()
            if args.async_mode and step + 1 < total_steps:
                pending = launch(step + 1)  # overlaps everything below until the next weight push
        t_wait = time.perf_counter() - t_step
        groups = broadcast_object(groups)  # sync point: rank 0's completions (token ids) to every rank
        mine = slice(d.rank * args.local_rollout_batch_size, (d.rank + 1) * args.local_rollout_batch_size)
        rows = [data.ds[i] for i in prompts_for(step)[mine]]
        completions = [c for g in groups[mine] for c in g]  # (token_ids, logprobs) per response
        queries, responses = [r["input_ids"] for r in rows for _ in range(n)], [c[0] for c in completions]
        B, R = len(queries), args.response_length
        batch = rollout_batch(queries, responses, tokenizer.pad_token_id, R)
        resp_mask = batch["response_mask"].to(d.device)  # (B, R)
        seq_lens = batch["seq_lens"].to(d.device)  # (B,)

        # ---- 2. score: old/ref log-probs, values, RM, verifiers (no grad; every model resharded after)
        t_score = time.perf_counter()
        engine_lp = engine_logprobs(completions, R).to(d.device)  # (B, R): what the engine sampled with
        engine_lp = engine_lp.masked_fill(~resp_mask, INVALID_LOGPROB)
        # π_old from the engine's own log-probs (one forward fewer), or recomputed by the learner
        old_lp, ref_lp, old_values, rm = score_rollouts(
            batch, None if args.use_vllm_logprobs else policy, ref, value, reward_model,
            args.local_rollout_forward_batch_size, d.device, args.temperature, chunked)  # (B, R) / (B,)
        old_lp = engine_lp if args.use_vllm_logprobs else old_lp
        ref_lp = ref_lp if ref is not None else old_lp  # beta = 0: no reference, a KL of zero
        texts = tokenizer.batch_decode([r[:R] for r in responses], skip_special_tokens=True)
        verified = (verify_rollouts(rows, n, texts, d.device) if args.apply_verifiable_reward
                    else torch.zeros(B, device=d.device))  # (B,)
        responses_t = batch["query_response"][:, batch["context_length"]:].to(d.device)  # (B, R)
        scores = args.scores(rm, verified, responses_t, seq_lens, stop_id)  # (B,)
        if args.overlong:  # DAPO's length shaping, on the score
            scores = scores + overlong_penalty(seq_lens + 1, R, args.overlong,
                                               args.overlong_penalty_factor)  # (B,)
        kl = kl_penalty(old_lp, ref_lp, args.kl).masked_fill(~resp_mask, 0.0)  # (B, R)
        # Off-policy correction for the engine's samples: weights on the surrogate, and the loss mask
        # (mis drops out-of-band tokens from the loss and its token count).
        is_weights, loss_mask, corr = rollout_correction(old_lp, engine_lp, resp_mask,
                                                         *args.correction)  # (B, R), (B, R)
        if args.filters_groups:  # groups of one verdict carry no signal: out of the loss and its token count
            informative = informative_groups(verified, n)  # (B,)
            loss_mask = loss_mask & informative[:, None]
            corr["val/informative_frac"] = informative.float().mean()

        # ---- 3. advantages (and, for ppo, returns and the value mask), by the algorithm's estimator
        advantages, returns, value_mask, non_score = rollout_advantages(
            algo, scores, kl, old_values, seq_lens, resp_mask, n, args.beta, args.gamma, args.lam,
            args.whiten_rewards, all_reduce)
        t_score = time.perf_counter() - t_score

        # ---- 4. update: num_epochs passes over the rollout batch's mini-batches, one optimizer step each
        t_train = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed * 7919 + step * 131 + d.rank)
        # The one normalization (tulu.losses.micro_batch_weight), FSDP summing the ranks' gradients: the
        # original's micro-batch means averaged over grad_accum micro-batches and the ranks; or (DAPO)
        # one token mean over the whole mini-batch, its tokens counted on every rank before any backward.
        mean_weight, _ = micro_batch_weight(1, micro_batches=grad_accum, world=d.world)
        for _ in range(args.num_epochs):
            for mb in torch.randperm(B, generator=g).split(args.local_mini_batch_size):
                # sync point (DAPO only): the mini-batch's loss tokens on all ranks, one all-reduce
                mini_tokens = (all_reduce(loss_mask[mb].sum().float()).clamp(min=1)
                               if algo.global_token_mean else None)
                for micro in mb.split(args.per_device_train_batch_size):
                    new_lp = response_logprobs(policy, batch, micro, d.device, args.temperature,
                                               chunked)  # (b, R)
                    pg_loss, pg_metrics = algo.policy_loss(new_lp, old_lp[micro], ref_lp[micro],
                                                           advantages[micro], loss_mask[micro], loss_cfg,
                                                           is_weights[micro])
                    weight = (micro_batch_weight(loss_mask[micro].sum(), global_count=mini_tokens)[0]
                              if algo.global_token_mean else mean_weight)
                    (weight * pg_loss).backward()  # each FSDP unit's reduce-scatter runs in here
                    for k, v in pg_metrics.items():  # micro-batch means: each weighs one
                        metrics.add(k, v)
                    if value is not None:
                        vpred = response_values(value, batch, micro, d.device)  # (b, R)
                        vf_loss, vf_metrics = ppo_value_loss(vpred, old_values[micro], returns[micro],
                                                             value_mask[micro], args.cliprange_value)
                        (args.vf_coef * mean_weight * vf_loss).backward()
                        for k, v in vf_metrics.items():
                            metrics.add(k, v)
                # one optimizer step per mini-batch; the clip's global norm is an all-reduce over ranks
                for k, net in trained.items():
                    metrics.add(f"{k}/grad_norm", clip_and_step(net, optimizers[k], schedulers[k],
                                                                args.clip_grad_norm))
        t_train = time.perf_counter() - t_train

        # ---- 5. new weights to the engines (waits for the background generation to finish first,
        # every rank in short polls, so it may outlast any collective timeout; see rollout/weight_sync.py)
        t_sync = time.perf_counter()
        sync.push(policy, version=step + 1)
        if check_every and (step + 1) % check_every == 0:  # the engines now hold the trainer's weights
            gaps = engine_sync_gaps(pool, d, policy, probe, probe_params, tokenizer.pad_token_id,
                                    args.temperature, chunked)
            # raises, naming the engines, the gap and the step
            check_engines_in_sync(gaps, check_tol, step + 1)
            metrics.add("debug/sync_check_gap", max(gaps.values()))
        t_sync = time.perf_counter() - t_sync

        # ---- 6. metrics, eval, checkpoint
        # Sync point: whether any rank got SIGTERM, agreed by all: a host tensor over gloo, so it never
        # waits for the device's queue of work.
        stopping = stop.agreed()
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
        # this rank's non-pad tokens (prompt + response), mean over ranks
        metrics.add("perf/batch_tokens", tokens)
        extra.update(mfu([(tokens * args.num_epochs, model_flops_per_token(net, L))
                          for net in trained.values()],
                         [(tokens, model_flops_per_token(net, L))
                          for net in (policy, ref, value, reward_model) if net is not None], step_s, peak))
        extra = broadcast_object(extra)  # rank 0's timings: the log line is one run's, not an average
        if eval_data is not None and ((step + 1) % eval_freq == 0 or step + 1 == total_steps):
            extra.update(held_out_correct_rate(pool, d, eval_data, tokenizer, eval_params,
                                               args.output_dir, step + 1))
        # The one host sync of the step's metrics: one all-reduce of every metric, then .tolist().
        out = metrics.log(step + 1, extra)
        if d.is_main and ((step + 1) % 5 == 0 or step == start_step):
            tqdm.write(f"step {step + 1}/{total_steps} score {out['objective/scores']:.2f} "
                       f"correct {out['objective/verifiable_correct_rate']:.3f} kl {out['objective/kl']:.3f}"
                       + (f" eval {out['eval/verifiable_correct_rate']:.3f}"
                          if "eval/verifiable_correct_rate" in out else ""))
        # A checkpoint every --save_freq steps or on a stop request (policy and value model with their
        # AdamW state; every rank writes its own rows, rank 0 marks it COMPLETE last).
        maybe_save(args, step + 1, steps_per_epoch, stopping, modules, rollout_batch_size, d,
                   lambda folder: export_hf(policy, tokenizer, folder, d.is_main),
                   {"episode": extra["episode"]})
        if stopping:
            break

    if d.is_main:  # a pending generation (stop requested) is cancelled or waited for
        executor.shutdown(wait=True, cancel_futures=True)
    # The final Hugging Face export of the policy gathers each parameter in turn (a collective).
    finish("rlvr", stopping, policy, tokenizer, args.output_dir, d.is_main)
    sync.close()
    if pool is not None:
        pool.shutdown()


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
    shutdown()  # main's models are freed: destroy the process group, exit without interpreter teardown
