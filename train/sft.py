"""Supervised fine-tuning (Tulu 3 stage 1) with FSDP2, padding-free packing and the original flags.

Embedded default (CPU, nothing downloaded): the tiny model on synthetic arithmetic chats.
    torchrun --standalone --nproc_per_node 2 train/sft.py

Tulu 3 8B SFT (open-instruct docs/tulu3.md; 8 nodes x 8 GPUs):
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29400 train/sft.py \
      --model_name_or_path meta-llama/Llama-3.1-8B --tokenizer_name meta-llama/Llama-3.1-8B \
      --use_flash_attn --max_seq_length 4096 --per_device_train_batch_size 1 --gradient_accumulation_steps 2 \
      --learning_rate 5e-06 --lr_scheduler_type linear --warmup_ratio 0.03 --weight_decay 0.0 \
      --num_train_epochs 2 \
      --output_dir output/sft_8b --with_tracking --report_to wandb --logging_steps 1 --reduce_loss sum \
      --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 --checkpointing_steps epoch --seed 123
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from tqdm import tqdm

from tulu.checkpoint import maybe_resume, maybe_save
from tulu.config import CheckpointArgs, HeadArgs, LogArgs, ModelArgs, OptimArgs, PlanArgs, cli
from tulu.data import StepBatches, build_sft_data
from tulu.dist import all_reduce, entrypoint, print0, shutdown
from tulu.export import export_hf
from tulu.lm_head import head_logprobs, next_token_targets
from tulu.loop import Throughput, batch_tokens, clip_and_step, finish, start_run
from tulu.losses import IGNORE_INDEX, load_balancing_loss, sft_loss, sft_loss_from_logprobs, sft_weight
from tulu.metrics import mfu, model_flops_per_token, peak_flops, run_metrics
from tulu.mixer import training_mixer
from tulu.model import build_model, router_aux_loss
from tulu.optim import build_optimizer
from tulu.packing import model_inputs, pack, pad


@dataclasses.dataclass
class Args(ModelArgs, OptimArgs, HeadArgs, LogArgs, CheckpointArgs, PlanArgs):
    dataset_mixer_list: list[str] | None = None
    """Mixture as `name frac_or_count ...` (a value with "." is a fraction, else a row count).
    Neither this nor --dataset_mixer given: the embedded synthetic set tulu/synth-sft."""
    dataset_mixer: str | None = None
    """Mixture as a JSON dict {"name": frac_or_count}."""
    dataset_mix_dir: str | None = None
    """Also write the mixed raw rows to {dir}/mixed_ds_train.jsonl."""
    max_seq_length: int | None = None
    """Right-truncate each conversation to this many tokens (no BOS is added). None: no truncation (the
    original's default; Tulu 3: 4096; the tiny preset: 256)."""
    reduce_loss: Literal["mean", "sum", "token_mean"] = "token_mean"
    """mean: micro-batch token means averaged (original default); sum: token sums / (grad_accum·world)
    (the Tulu 3 runs); token_mean: one mean over every trained token of the step (recommended)."""
    packing: bool = True
    """Padding-free rows: best-fit-packed documents of up to per_device_train_batch_size·max_seq_length tokens
    (with no max_seq_length: times the longest conversation)."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenization (cached on disk, keyed by data, tokenizer, template and length)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping with an error naming the row and field."""


def plan(args: Args, mixer: dict) -> None:
    """--dry_run: the schedule and per-rank memory at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan, steps_line

    world = default_world(args.preset, args.dry_run_world_size)
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps, schedule = steps_line(count_rows(mixer), G, args.num_train_epochs, args.max_train_steps,
                                 args.warmup_ratio)
    lines = [("global batch", f"{G} sequences ({args.per_device_train_batch_size} x "
                              f"{args.gradient_accumulation_steps} x {world} ranks)"), *schedule]
    if args.max_seq_length:  # without a truncation length the bound is the data's longest row
        lines.insert(1, ("tokens / step (at most)", G * args.max_seq_length))
        if steps:
            lines.append(("tokens (at most)", f"{steps * G * args.max_seq_length:.3e}"))
    step = StepPlan(args.max_seq_length and args.per_device_train_batch_size * args.max_seq_length,
                    checkpointing=args.gradient_checkpointing, chunked=args.chunked_lm_head,
                    repeat_kv=not args.use_flash_attn, mixed_precision=args.mixed_precision)
    print_plan("sft", world=world, preset=args.preset, cpu_offload=args.cpu_offload, lines=lines,
               models={"policy": (args.model_name_or_path, "causal_lm", True)}, step=step)


@entrypoint  # one rank's crash: its traceback shown once, every rank stopped
def main(args: Args) -> None:
    mixer, _ = training_mixer(args.dataset_mixer_list, args.dataset_mixer, embedded="tulu/synth-sft")
    if args.dry_run:
        return plan(args, mixer)
    d, stop, compute_dtype, attn = start_run(args)  # tulu.loop: process group, output_dir, stop, seed
    tokenizer = args.load_tokenizer()
    data = build_sft_data(mixer, tokenizer, args.max_seq_length, args.skip_bad_rows, args.dataset_mix_dir,
                          args.preprocessing_num_workers, d.is_main)
    # Built on the meta device, sharded, then each rank reads only its own rows (tulu/model.py).
    model = build_model(args.model_name_or_path, d.device, revision=args.model_revision,
                        vocab_size=len(tokenizer), attn_implementation=attn,
                        compute_dtype=compute_dtype, cpu_offload=args.cpu_offload,
                        reshard_after_forward=args.reshard_after_forward,
                        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    modules = {"model": (model, optimizer)}  # what a checkpoint holds

    global_batch, steps_per_epoch, total_steps, scheduler = args.schedule(optimizer, len(data), d.world)
    batches_of = StepBatches(data.lengths, args.seed, global_batch, d.rank, d.world,
                             args.per_device_train_batch_size, args.gradient_accumulation_steps, args.packing)
    # The newest complete checkpoint under output_dir, if any (any world size): weights, AdamW state,
    # the schedule and the data position, so the loss curve continues exactly.
    start_step = maybe_resume(args, modules, [scheduler], global_batch, d)
    n_params = sum(p.numel() for p in model.parameters())
    seq_len = args.max_seq_length or int(data.lengths.max())  # no truncation: the longest conversation
    flops_tok, peak = model_flops_per_token(model, seq_len), peak_flops(d.device)
    metrics, _ = run_metrics(args, d)
    print0(f"[sft] {len(data)} examples, {n_params / 1e6:.2f}M params, world {d.world}, "
           f"global batch {global_batch}, {total_steps} steps, reduce_loss={args.reduce_loss}, "
           f"packing={args.packing}, dtype={compute_dtype}")

    # A packed row holds at most what a padded micro-batch of per_device sequences would.
    capacity = args.per_device_train_batch_size * seq_len
    collate = pack if args.packing else pad
    throughput = Throughput()
    stopping = False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc="sft", mininterval=5,
                     initial=start_step, total=total_steps):
        _, mbs = batches_of(step, capacity)  # this rank's micro-batches (row ids) of the step's global batch
        batches = [collate(data.rows(mb), tokenizer.pad_token_id) for mb in mbs]  # on the host
        # The step's trained-token count over every micro-batch and rank, BEFORE any backward: the
        # token_mean weight divides by it. Sync point: one all-reduce of one number, read by no host.
        local_tokens = sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batches).float()
        global_tokens = all_reduce(local_tokens.to(d.device))
        for batch in batches:
            inputs, labels = model_inputs(model, batch, d.device), batch["labels"].to(d.device)
            with router_aux_loss(model, args.load_balancing_loss) as aux:  # MoE: the router's loss
                if args.chunked_lm_head:  # targets[:, t] = the token after t: the shift happens here
                    targets = next_token_targets(labels)
                    ce_sum, m = sft_loss_from_logprobs(head_logprobs(model, inputs, targets)[0], targets)
                else:
                    ce_sum, m = sft_loss(model(**inputs).logits, labels)  # logits (B, T, V)
            # The one normalization (tulu.losses.micro_batch_weight): FSDP sums the ranks' gradients,
            # so weight · Σ CE over every micro-batch and rank is exactly the step's objective.
            weight, share = sft_weight(args.reduce_loss, m["tokens"], global_tokens, len(batches),
                                       args.gradient_accumulation_steps, d.world)
            balance = load_balancing_loss(aux, args.load_balancing_weight, len(batches), d.world)
            (weight * ce_sum + balance).backward()  # each FSDP unit's reduce-scatter runs in here
            # The loss is logged as the step's objective: the share is what this micro-batch is of it.
            metrics.add("train/loss", weight * ce_sum.detach(), share)
            metrics.add("train/ce_sum", ce_sum.detach())
            metrics.add("train/tokens", m["tokens"])
            if aux:  # the original logged weight · aux, averaged
                metrics.add("train/aux_loss", args.load_balancing_weight * aux[0].detach())
            throughput.add(*batch_tokens(batch))  # host integers: no sync
        # The global gradient norm is an all-reduce over ranks; it stays on the device until a log step.
        metrics.add("train/grad_norm", clip_and_step(model, optimizer, scheduler, args.clip_grad_norm))
        # Sync point: whether any rank got SIGTERM, agreed by all: a host tensor over gloo, so it never
        # waits for the device's queue of work.
        stopping = stop.agreed()

        # The log step is the one host sync of the loop: one all-reduce of every metric, then .tolist().
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps or stopping:
            seconds, tps, padding = throughput.lap()
            extra = {"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                     "perf/tokens_per_s_per_device": tps, "perf/padding_fraction": padding,
                     **mfu([(tps * seconds, flops_tok)], [], seconds, peak)}
            out = metrics.log(step + 1, extra,
                              ratios={"train/loss_per_token": ("train/ce_sum", "train/tokens")})
            if d.is_main:
                tqdm.write(f"step {step + 1}/{total_steps} loss {out['train/loss']:.4f} "
                           f"loss/token {out['train/loss_per_token']:.4f} lr {extra['train/lr']:.2e} "
                           f"tok/s/dev {tps:.0f}")

        # A checkpoint when --checkpointing_steps says so or on a stop request (every rank writes its
        # own rows; rank 0 marks it COMPLETE last, so a crash mid-save never looks complete).
        maybe_save(args, step + 1, steps_per_epoch, stopping, modules, global_batch, d,
                   lambda folder: export_hf(model, tokenizer, folder, d.is_main))
        if stopping:
            break

    # The final Hugging Face export gathers each parameter in turn (a collective on every rank).
    finish("sft", stopping, model, tokenizer, args.output_dir, d.is_main)


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
    shutdown()  # main's models are freed: destroy the process group, exit without interpreter teardown
