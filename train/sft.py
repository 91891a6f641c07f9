"""Supervised fine-tuning (Tulu 3 stage 1) with FSDP2, padding-free packing and the original flags.

Embedded default (CPU, nothing downloaded): the tiny model on synthetic arithmetic chats.
    torchrun --standalone --nproc_per_node 2 train/sft.py

Tulu 3 8B SFT (open-instruct docs/tulu3.md; 8 nodes x 8 GPUs):
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29400 train/sft.py \
      --model_name_or_path meta-llama/Llama-3.1-8B --tokenizer_name meta-llama/Llama-3.1-8B \
      --use_flash_attn --max_seq_length 4096 --per_device_train_batch_size 1 --gradient_accumulation_steps 2 \
      --learning_rate 5e-06 --lr_scheduler_type linear --warmup_ratio 0.03 --weight_decay 0.0 --num_train_epochs 2 \
      --output_dir output/sft_8b --with_tracking --report_to wandb --logging_steps 1 --reduce_loss sum \
      --dataset_mixer_list allenai/tulu-3-sft-mixture 1.0 --checkpointing_steps epoch --seed 123
"""
from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from tqdm import tqdm

from tulu.config import CheckpointArgs, LogArgs, ModelArgs, OptimArgs, PlanArgs, cli
from tulu.checkpoint import export_hf
from tulu.data import build_sft_data, epoch_permutation, rank_microbatches, step_samples
from tulu.dist import all_reduce, entrypoint, init_dist, print0, shutdown
from tulu.fsdp import resolve_compute_dtype
from tulu.lm_head import head_logprobs, next_token_targets
from tulu.losses import sft_loss, sft_loss_from_logprobs
from tulu.metrics import Metrics, mfu, model_flops_per_token, peak_flops, start_tracker
from tulu.mixer import parse_mixer
from tulu.model import build_model, flash_attn_or_fallback, load_tokenizer
from tulu.optim import build_optimizer, build_scheduler
from tulu.packing import model_inputs, pack, pad
from tulu.resume import StopRequest, hold_output_dir, maybe_resume, maybe_save


@dataclasses.dataclass
class Args(ModelArgs, OptimArgs, LogArgs, CheckpointArgs, PlanArgs):
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
    chunked_lm_head: bool = True
    """Cross-entropy through the LM head a chunk of tokens at a time, recomputed in backward
    (tulu/lm_head.py): the (tokens, vocab) logits are never built. False: the model's full logits."""


def plan(args: Args, mixer: dict) -> None:
    """--dry_run: the schedule and per-rank memory at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan, steps_line

    world = default_world(args.preset, args.dry_run_world_size)
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps, schedule = steps_line(count_rows(mixer), G, args.num_train_epochs, args.max_train_steps, args.warmup_ratio)
    lines = [("global batch", f"{G} sequences ({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
                              f"x {world} ranks)"), *schedule]
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
    given = args.dataset_mixer_list is not None or args.dataset_mixer is not None
    mixer = parse_mixer(args.dataset_mixer_list, args.dataset_mixer) if given else {"tulu/synth-sft": 1.0}
    if args.dry_run:
        return plan(args, mixer)
    d = init_dist()
    hold_output_dir(args.output_dir, d.is_main)  # one writer per output_dir (flock; names the holder)
    args.use_flash_attn = flash_attn_or_fallback(args.use_flash_attn, d.device)  # else sdpa, said once
    stop = StopRequest()
    torch.manual_seed(args.seed)
    compute_dtype = resolve_compute_dtype(args.mixed_precision, d.device)
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.model_revision,
                               args.chat_template_name, args.use_slow_tokenizer)
    data = build_sft_data(mixer, tokenizer, args.max_seq_length, args.skip_bad_rows, args.dataset_mix_dir,
                          args.preprocessing_num_workers, d.is_main)
    model = build_model(args.model_name_or_path, d.device, revision=args.model_revision, vocab_size=len(tokenizer),
                        attn_implementation="flash_attention_2" if args.use_flash_attn else "sdpa",
                        compute_dtype=compute_dtype, cpu_offload=args.cpu_offload,
                        reshard_after_forward=args.reshard_after_forward,
                        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)

    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * d.world
    steps_per_epoch = -(-len(data) // global_batch)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, int(total_steps * args.warmup_ratio), args.lr_scheduler_type)
    n_params = sum(p.numel() for p in model.parameters())
    seq_len = args.max_seq_length or int(data.lengths.max())  # no truncation: the longest conversation
    flops_tok, peak = model_flops_per_token(model, seq_len), peak_flops(d.device)
    metrics = Metrics(args.output_dir, d.is_main, d.device, start_tracker(args, dataclasses.asdict(args)))
    start_step = maybe_resume(args, {"model": (model, optimizer)}, scheduler, global_batch, d.rank, d.world)
    print0(f"[sft] {len(data)} examples, {n_params / 1e6:.2f}M params, world {d.world}, global batch {global_batch}, "
           f"{total_steps} steps, reduce_loss={args.reduce_loss}, packing={args.packing}, dtype={compute_dtype}")

    capacity = args.per_device_train_batch_size * seq_len
    collate = pack if args.packing else pad
    window_tokens, window_slots, window_start = 0, 0, time.perf_counter()
    perm_epoch, stopped = None, False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc="sft", mininterval=5,
                     initial=start_step, total=total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if perm_epoch != epoch:
            perm, perm_epoch = epoch_permutation(len(data), args.seed, epoch), epoch
        samples = step_samples(perm, step_in_epoch, global_batch)
        mbs = rank_microbatches(samples, data.lengths, d.rank, d.world, args.per_device_train_batch_size,
                                args.gradient_accumulation_steps, args.packing, capacity)
        batches = [collate(data.rows(mb), tokenizer.pad_token_id) for mb in mbs]
        # The step's trained-token count, across micro-batches and ranks, before any backward; a
        # stop request rides along so every rank agrees on when to stop (read after the step).
        local_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in batches).float()
        counts = all_reduce(torch.stack([local_tokens, torch.tensor(float(stop.requested))]).to(d.device))
        global_tokens = counts[0]
        # mean: average over the micro-batches actually run; sum: the original's fixed 1/(GA·W).
        grad_accum = len(batches) if args.reduce_loss == "mean" else args.gradient_accumulation_steps
        for batch in batches:
            inputs, labels = model_inputs(batch, d.device, args.use_flash_attn), batch["labels"].to(d.device)
            if args.chunked_lm_head:  # targets[:, t] = the token after t: the shift happens here
                targets = next_token_targets(labels)
                token_logps, _ = head_logprobs(model, inputs, targets)  # (B, T) fp32
                loss, m = sft_loss_from_logprobs(token_logps, targets, args.reduce_loss, grad_accum, d.world,
                                                 global_tokens)
            else:
                logits = model(**inputs).logits  # (B, T, V)
                loss, m = sft_loss(logits, labels, args.reduce_loss, grad_accum, d.world, global_tokens)
            loss.backward()
            metrics.add("train/loss", loss.detach() * len(batches))  # averaged over micro-batches: = their sum
            metrics.add("train/ce_sum", m["ce_sum"])
            metrics.add("train/tokens", m["tokens"])
            window_tokens += int(batch["input_ids"].numel()) if args.packing else int(batch["attention_mask"].sum())
            window_slots += int(batch["input_ids"].numel())
        # Pre-clip global norm (a collective over ranks); an infinite max_norm only measures it.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf"))
        metrics.add("train/grad_norm", grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stopping = bool(counts[1] > 0)  # a host read of a tensor the step finished with long ago

        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps or stopping:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            extra = {"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                     "perf/tokens_per_s_per_device": tps, "perf/padding_fraction": 1 - window_tokens / max(1, window_slots)}
            extra.update(mfu([(window_tokens, flops_tok)], [], elapsed, peak))
            out = metrics.log(step + 1, extra, ratios={"train/loss_per_token": ("train/ce_sum", "train/tokens")})
            if d.is_main:
                tqdm.write(f"step {step + 1}/{total_steps} loss {out['train/loss']:.4f} "
                           f"loss/token {out['train/loss_per_token']:.4f} lr {extra['train/lr']:.2e} tok/s/dev {tps:.0f}")
            window_tokens, window_slots, window_start = 0, 0, time.perf_counter()

        maybe_save(args, step + 1, steps_per_epoch, stopping, {"model": (model, optimizer)}, global_batch,
                   d.rank, d.world, lambda folder: export_hf(model, tokenizer, folder, d.is_main))
        if stopping:
            stopped = True
            break

    if not stopped:
        export_hf(model, tokenizer, args.output_dir, d.is_main)
        print0(f"[sft] saved Hugging Face model to {args.output_dir}")
    del model, optimizer, scheduler
    shutdown()


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
