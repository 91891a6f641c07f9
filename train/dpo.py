"""Direct preference optimization (Tulu 3 stage 2): dpo, dpo_norm, simpo and wpo with FSDP2, one
forward per pair micro-batch, and the reference as a live frozen model or a precomputed cache.

Embedded default (CPU, nothing downloaded): synthetic pairs (correct vs wrong answer), held-out eval
at the end. The demo pipeline feeds it the SFT default's output:
    torchrun --standalone --nproc_per_node 2 train/sft.py --output_dir output/sft
    torchrun --standalone --nproc_per_node 2 train/dpo.py --model_name_or_path output/sft --output_dir output/dpo

Tulu 3 8B DPO (open-instruct docs/tulu3.md, dpo_tune.py with a live reference; 1 node x 8 GPUs):
    torchrun --nproc_per_node 8 train/dpo.py \
      --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT --tokenizer_name allenai/Llama-3.1-Tulu-3-8B-SFT \
      --use_flash_attn --gradient_checkpointing --max_seq_length 2048 --per_device_train_batch_size 1 \
      --gradient_accumulation_steps 16 --learning_rate 5e-07 --lr_scheduler_type linear --warmup_ratio 0.1 \
      --weight_decay 0.0 --num_train_epochs 1 --dpo_loss_type dpo_norm --dpo_beta 5 --reference_logprobs live \
      --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --output_dir output/dpo_8b \
      --with_tracking --report_to wandb --logging_steps 1 --seed 42

Tulu 3 70B DPO (dpo_tune_cache.py: cached reference, ZeRO-3 CPU offload; 8 nodes x 8 GPUs): as above with
    --model_name_or_path allenai/Llama-3.1-Tulu-3-70B-SFT --dataset_mixer_list allenai/llama-3.1-tulu-3-70b-preference-mixture 1.0
    --gradient_accumulation_steps 2 --learning_rate 2e-07 --reference_logprobs cache --cpu_offload
    (torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29400)

Gradient of a step = mean over ALL pairs of the global batch (G = per_device·grad_accum·world, fixed:
the epoch's last step wraps around), whatever the micro-batch layout: each micro-batch's pair-mean
loss is scaled by pairs·world/G before backward (FSDP's rank average divides the world back out).
The original's 1/(GA·W)·Σ mean_micro-batch is the same thing when every micro-batch holds the same
number of pairs; packed micro-batches hold different numbers, so the weights matter.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from tulu.checkpoint import export_hf
from tulu.config import CheckpointArgs, LogArgs, ModelArgs, OptimArgs, PlanArgs, cli
from tulu.data import epoch_permutation, rank_microbatches, step_samples
from tulu.dist import all_reduce, entrypoint, init_dist, print0, shutdown
from tulu.fsdp import reshard, resolve_compute_dtype
from tulu.losses import DPO_LOSSES
from tulu.metrics import Metrics, mfu, model_flops_per_token, peak_flops, start_tracker
from tulu.mixer import parse_mixer
from tulu.model import build_model, flash_attn_or_fallback, load_tokenizer
from tulu.optim import build_optimizer, build_scheduler
from tulu.preference import (build_preference_data, cached_logps, collate_pairs, data_identity, evaluate,
                             model_identity, pair_logps, pair_loss, reference_cache)
from tulu.resume import StopRequest, hold_output_dir, maybe_resume, maybe_save


@dataclasses.dataclass
class Args(ModelArgs, OptimArgs, LogArgs, CheckpointArgs, PlanArgs):
    dataset_mixer_list: list[str] | None = None
    """Preference mixture as `name frac_or_count ...`: rows with `chosen` and `rejected` message lists that
    share the prompt and end in an assistant turn. Neither this nor --dataset_mixer: the embedded tulu/synth-pref."""
    dataset_mixer: str | None = None
    """Mixture as a JSON dict {"name": frac_or_count}."""
    dataset_mix_dir: str | None = None
    """Also write the mixed raw rows to {dir}/mixed_ds_train.jsonl."""
    dataset_eval_mixer_list: list[str] | None = None
    """Held-out preference pairs scored at the end (and every --eval_steps). Default: the embedded
    tulu/synth-pref-eval when training on the embedded default, else no evaluation."""
    dataset_eval_split: str = "train"
    """Split of the eval mixer's hub datasets."""
    eval_steps: int | None = None
    """Also evaluate every this many optimizer steps (always once at the end when there is an eval set)."""
    max_seq_length: int | None = None
    """Right-truncate each of chosen and rejected to this many tokens. None: no truncation (the original's
    default; Tulu 3: 2048; the tiny preset: 256)."""
    dpo_loss_type: Literal["dpo", "dpo_norm", "simpo", "wpo"] = "dpo_norm"
    """dpo: summed log-probs; dpo_norm: token-averaged (Tulu 3); simpo: averaged, reference-free, margin
    γ; wpo: dpo weighted by the policy's own likelihood of both responses."""
    dpo_beta: float | None = None
    """β, the inverse temperature of the implicit reward. Default: 5 with dpo_norm (Tulu 3), else 0.1
    (the original's default)."""
    dpo_gamma_beta_ratio: float = 0.3
    """SimPO target margin as γ/β."""
    dpo_label_smoothing: float = 0.0
    """Conservative-DPO label smoothing ε (assumed preference-label noise)."""
    reference_logprobs: Literal["live", "cache"] = "cache"
    """cache: score every pair once with the initial weights before training (sharded over ranks, stored
    in {output_dir}/reference_logprobs, reused on rerun with the same data and model), so no second
    model is ever held; live: a frozen FSDP-sharded reference model runs beside the policy every step."""
    packing: bool = True
    """One padding-free row per micro-batch (pairs best-fit-packed, up to per_device·2·max_seq_length
    tokens); otherwise [chosen; rejected] rows right-padded to the longest."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenization (cached on disk, keyed by data, tokenizer, template and length)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping with an error naming the row and field."""
    chunked_lm_head: bool = True
    """Sequence log-probs through the LM head a chunk of tokens at a time, recomputed in backward
    (tulu/lm_head.py): the (tokens, vocab) logits are never built. False: the model's full logits."""
    # The optimizer flags keep the original's defaults (2e-5, warmup 0.03, 2 epochs, 8 pairs per device);
    # the Tulu 3 commands set 5e-7, warmup 0.1, 1 epoch, 128 pairs per step (presets tulu3_*_dpo).
    use_lora: bool = False
    """Accepted so the seed commands' `--use_lora False` translates; LoRA itself is not implemented."""


def plan(args: Args, mixer: dict) -> None:
    """--dry_run: the schedule and per-rank memory at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan, steps_line

    world = default_world(args.preset, args.dry_run_world_size)
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps, schedule = steps_line(count_rows(mixer), G, args.num_train_epochs, args.max_train_steps, args.warmup_ratio)
    needs_ref = DPO_LOSSES[args.dpo_loss_type].needs_reference
    lines = [("global batch", f"{G} pairs ({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
                              f"x {world} ranks)"), *schedule,
             ("reference", args.reference_logprobs if needs_ref else "none (reference-free)")]
    if args.max_seq_length:  # without a truncation length the bound is the data's longest pair
        lines.insert(1, ("tokens / step (at most)", 2 * G * args.max_seq_length))
    models = {"policy": (args.model_name_or_path, "causal_lm", True)}
    if needs_ref and args.reference_logprobs == "live":
        models["reference (frozen)"] = (args.model_name_or_path, "causal_lm", False)
    # a micro-batch holds each pair's chosen and rejected rows
    step = StepPlan(args.max_seq_length and 2 * args.per_device_train_batch_size * args.max_seq_length,
                    checkpointing=args.gradient_checkpointing, chunked=args.chunked_lm_head,
                    repeat_kv=not args.use_flash_attn, mixed_precision=args.mixed_precision)
    print_plan(f"dpo ({args.dpo_loss_type})", world=world, preset=args.preset, cpu_offload=args.cpu_offload,
               lines=lines, models=models, step=step)


@entrypoint  # one rank's crash: its traceback shown once, every rank stopped
def main(args: Args) -> None:
    if args.use_lora:
        raise SystemExit("--use_lora True: LoRA is not implemented (Tulu 3 trained every weight: --use_lora False)")
    given = args.dataset_mixer_list is not None or args.dataset_mixer is not None
    mixer = parse_mixer(args.dataset_mixer_list, args.dataset_mixer) if given else {"tulu/synth-pref": 1.0}
    if args.dry_run:
        return plan(args, mixer)
    d = init_dist()
    hold_output_dir(args.output_dir, d.is_main)  # one writer per output_dir (flock; names the holder)
    args.use_flash_attn = flash_attn_or_fallback(args.use_flash_attn, d.device)  # else sdpa, said once
    stop = StopRequest()
    torch.manual_seed(args.seed)
    compute_dtype = resolve_compute_dtype(args.mixed_precision, d.device)
    loss_type = DPO_LOSSES[args.dpo_loss_type]  # dispatch once
    use_cache = loss_type.needs_reference and args.reference_logprobs == "cache"
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.model_revision,
                               args.chat_template_name, args.use_slow_tokenizer)
    eval_mixer = (parse_mixer(args.dataset_eval_mixer_list) if args.dataset_eval_mixer_list
                  else None if given else {"tulu/synth-pref-eval": 1.0})
    data_kw = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, skip_bad_rows=args.skip_bad_rows,
                   num_proc=args.preprocessing_num_workers, is_main=d.is_main)
    data = build_preference_data(mixer, mix_dir=args.dataset_mix_dir, **data_kw)
    eval_data = build_preference_data(eval_mixer, split=args.dataset_eval_split, **data_kw) if eval_mixer else None
    model_kw = dict(revision=args.model_revision, vocab_size=len(tokenizer),
                    attn_implementation="flash_attention_2" if args.use_flash_attn else "sdpa",
                    compute_dtype=compute_dtype, cpu_offload=args.cpu_offload,
                    reshard_after_forward=args.reshard_after_forward, seed=args.seed)
    model = build_model(args.model_name_or_path, d.device, gradient_checkpointing=args.gradient_checkpointing, **model_kw)
    # Before any forward: a no-grad forward swaps the lm_head unit's Parameter for an unsharded one that
    # the root's reshard() does not swap back (measured, torch 2.13; tulu.fsdp.reshard does); an optimizer
    # built then would hold that stale object and never update lm_head.
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)

    # ---- the reference: a cache scored by the initial policy itself, a live frozen copy, or nothing (simpo)
    pad_id, flash, chunked = tokenizer.pad_token_id, args.use_flash_attn, args.chunked_lm_head
    reference, tables = None, {}
    if use_cache:
        # The policy has not taken a step yet, so it IS the reference: scoring with it needs no second
        # model at all (dpo_tune_cache.py did the same). Keyed by the tokenized data, the weight files
        # and the numerics; sums and averages are both stored, so every loss type reuses it.
        # A resumed run scores (or reuses) the cache here too: the checkpoint loads only further down.
        key = {"model": model_identity(model.name_or_path), "dtype": compute_dtype, "flash": flash,
               "vocab": len(tokenizer), "chunked_lm_head": chunked}
        for name, ds in (("train", data), ("eval", eval_data)):
            if ds is not None:
                tables[name] = reference_cache(model, ds, Path(args.output_dir) / "reference_logprobs" / name,
                                               {**key, "data": data_identity(ds)}, d.rank, d.world,
                                               args.per_device_train_batch_size, args.packing, pad_id, d.device, flash,
                                               chunked)
    elif loss_type.needs_reference:
        reference = build_model(args.model_name_or_path, d.device, frozen=True, **model_kw)
    else:
        print0(f"[dpo] {args.dpo_loss_type} is reference-free: no reference model, no reference cache")

    def reference_logps(split: str, idxs: list[int], batch: dict) -> dict | None:
        """The reference log-probs of a micro-batch: a cache lookup, a live no-grad forward, or None."""
        if use_cache:
            return cached_logps(tables[split], idxs, d.device)
        if reference is None:
            return None
        with torch.no_grad():
            out = pair_logps(reference, batch, d.device, flash, chunked)
        reshard(reference)  # a no-grad forward leaves FSDP units unsharded (cpu_environment.md §2)
        return out

    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * d.world
    steps_per_epoch = -(-len(data) // global_batch)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, int(total_steps * args.warmup_ratio), args.lr_scheduler_type)
    start_step = maybe_resume(args, {"model": (model, optimizer)}, scheduler, global_batch, d.rank, d.world)
    tracker = start_tracker(args, dataclasses.asdict(args))
    metrics = Metrics(args.output_dir, d.is_main, d.device, tracker)
    eval_log = Metrics(args.output_dir, d.is_main, d.device, tracker)  # eval lines never flush a train window
    beta = args.dpo_beta if args.dpo_beta is not None else 5.0 if args.dpo_loss_type == "dpo_norm" else 0.1
    loss_kw = dict(loss_type=loss_type, beta=beta, gamma_beta_ratio=args.dpo_gamma_beta_ratio,
                   label_smoothing=args.dpo_label_smoothing)
    print0(f"[dpo] {len(data)} pairs (dropped {data.dropped} truncated, skipped {data.skipped} bad), "
           f"{len(eval_data) if eval_data else 0} eval pairs, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
           f"params, world {d.world}, global batch {global_batch} pairs, {total_steps} steps, loss {args.dpo_loss_type} "
           f"beta {beta}, reference {args.reference_logprobs if loss_type.needs_reference else 'none'}, "
           f"packing={args.packing}, dtype={compute_dtype}")

    def run_eval(step: int) -> None:
        out = evaluate(model, eval_data, lambda idxs, batch: reference_logps("eval", idxs, batch), loss_kw,
                       d.rank, d.world, args.per_device_train_batch_size, args.packing, pad_id, d.device, flash,
                       chunked)
        eval_log.log(step, out)
        if d.is_main:
            (Path(args.output_dir) / "eval_results.json").write_text(json.dumps({"step": step, **out}, indent=1))
            tqdm.write(f"eval step {step}: loss {out['eval/loss']:.4f} rewards/accuracy {out['eval/rewards/accuracy']:.3f} "
                       f"rewards/margin {out['eval/rewards/margin']:.4f}")

    # A pair = chosen + rejected tokens; with no truncation length, the longest pair bounds a row.
    pair_len = 2 * args.max_seq_length if args.max_seq_length else int(data.lengths.max())
    capacity = args.per_device_train_batch_size * pair_len
    flops_tok, peak = model_flops_per_token(model, pair_len // 2), peak_flops(d.device)
    window_tokens, window_slots, window_start = 0, 0, time.perf_counter()
    perm_epoch, stopped = None, False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc="dpo", mininterval=5,
                     initial=start_step, total=total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if perm_epoch != epoch:
            perm, perm_epoch = epoch_permutation(len(data), args.seed, epoch), epoch
        stop_flag = all_reduce(torch.tensor(float(stop.requested), device=d.device))  # every rank agrees
        samples = step_samples(perm, step_in_epoch, global_batch)
        mbs = rank_microbatches(samples, data.lengths, d.rank, d.world, args.per_device_train_batch_size,
                                args.gradient_accumulation_steps, args.packing, capacity)
        for mb in mbs:
            batch = collate_pairs(data.rows(mb), pad_id, args.packing)
            policy = pair_logps(model, batch, d.device, flash, chunked)  # (B,) x 4: chosen and rejected, one forward
            loss, m = pair_loss(policy=policy, reference=reference_logps("train", mb, batch), **loss_kw)
            # This micro-batch's share of the step's mean over G pairs; FSDP averages over ranks, so ×world.
            # G is fixed (step_samples wraps), so no count collective is needed before backward.
            weight = len(mb) * d.world / global_batch
            (loss * weight).backward()
            for name, value in m.items():  # pair-weighted: Metrics averages over micro-batches and ranks
                metrics.add(f"train/{name}", value * weight * len(mbs))
            real = int(batch["input_ids"].numel()) if args.packing else int(batch["attention_mask"].sum())
            window_tokens += real if mb else 0
            window_slots += int(batch["input_ids"].numel())
        # Pre-clip global norm (a collective over ranks); an infinite max_norm only measures it.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm if args.clip_grad_norm > 0 else float("inf"))
        metrics.add("train/grad_norm", grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - window_start
            extra = {"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                     "perf/tokens_per_s_per_device": window_tokens / elapsed,
                     "perf/padding_fraction": 1 - window_tokens / max(1, window_slots),
                     # the live reference's forward counts; a cached one cost nothing this window
                     **mfu([(window_tokens, flops_tok)], [(window_tokens, flops_tok)] if reference else [], elapsed, peak)}
            out = metrics.log(step + 1, extra)
            if d.is_main:
                tqdm.write(f"step {step + 1}/{total_steps} loss {out['train/loss']:.4f} "
                           f"acc {out['train/rewards/accuracy']:.3f} margin {out['train/rewards/margin']:.4f} "
                           f"lr {extra['train/lr']:.2e} tok/s/dev {extra['perf/tokens_per_s_per_device']:.0f}")
            window_tokens, window_slots, window_start = 0, 0, time.perf_counter()
        if eval_data is not None and args.eval_steps and (step + 1) % args.eval_steps == 0 and step + 1 < total_steps:
            run_eval(step + 1)
        stopping = bool(stop_flag > 0)
        maybe_save(args, step + 1, steps_per_epoch, stopping, {"model": (model, optimizer)}, global_batch,
                   d.rank, d.world, lambda folder: export_hf(model, tokenizer, folder, d.is_main))
        if stopping:
            stopped = True
            break
    if not stopped:
        if eval_data is not None:
            run_eval(total_steps)
        export_hf(model, tokenizer, args.output_dir, d.is_main)
        print0(f"[dpo] saved Hugging Face model to {args.output_dir}")
    del model, reference, optimizer, scheduler
    shutdown()


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
