"""Direct preference optimization (Tulu 3 stage 2): dpo, dpo_norm, simpo and wpo with FSDP2, one
forward per pair micro-batch, and the reference as a live frozen model or a precomputed cache.

Embedded default (CPU, nothing downloaded): synthetic pairs (correct vs wrong answer), held-out eval
at the end. The demo pipeline feeds it the SFT default's output:
    torchrun --standalone --nproc_per_node 2 train/sft.py --output_dir output/sft
    torchrun --standalone --nproc_per_node 2 train/dpo.py --model_name_or_path output/sft \
      --output_dir output/dpo

Tulu 3 8B DPO (open-instruct docs/tulu3.md, dpo_tune.py with a live reference; 1 node x 8 GPUs):
    torchrun --nproc_per_node 8 train/dpo.py \
      --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT --tokenizer_name allenai/Llama-3.1-Tulu-3-8B-SFT \
      --use_flash_attn --gradient_checkpointing --max_seq_length 2048 --per_device_train_batch_size 1 \
      --gradient_accumulation_steps 16 --learning_rate 5e-07 --lr_scheduler_type linear --warmup_ratio 0.1 \
      --weight_decay 0.0 --num_train_epochs 1 --dpo_loss_type dpo_norm --dpo_beta 5 \
      --reference_logprobs live \
      --dataset_mixer_list allenai/llama-3.1-tulu-3-8b-preference-mixture 1.0 --output_dir output/dpo_8b \
      --with_tracking --report_to wandb --logging_steps 1 --seed 42

Tulu 3 70B DPO (dpo_tune_cache.py: cached reference, ZeRO-3 CPU offload; 8 nodes x 8 GPUs): as above with
    --model_name_or_path allenai/Llama-3.1-Tulu-3-70B-SFT
    --dataset_mixer_list allenai/llama-3.1-tulu-3-70b-preference-mixture 1.0
    --gradient_accumulation_steps 2 --learning_rate 2e-07 --reference_logprobs cache --cpu_offload
    (torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29400)

Gradient of a step = mean over ALL pairs of the global batch (G = per_device·grad_accum·world, fixed:
the epoch's last step wraps around), whatever the micro-batch layout: each micro-batch's summed loss
is weighted by 1/G before backward, and FSDP sums the ranks' gradients (tulu.losses.micro_batch_weight).
The original's 1/(GA·W)·Σ mean_micro-batch is the same thing when every micro-batch holds the same
number of pairs; packed micro-batches hold different numbers, so the weights matter.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from tulu.checkpoint import maybe_resume, maybe_save
from tulu.config import CheckpointArgs, HeadArgs, LogArgs, ModelArgs, OptimArgs, PlanArgs, cli
from tulu.data import StepBatches
from tulu.dist import entrypoint, print0, shutdown
from tulu.export import export_hf
from tulu.fsdp import no_grad_forward
from tulu.loop import Throughput, batch_tokens, clip_and_step, finish, start_run
from tulu.losses import DPO_LOSSES, load_balancing_loss, micro_batch_weight
from tulu.metrics import mfu, model_flops_per_token, peak_flops, run_metrics
from tulu.mixer import parse_mixer, training_mixer
from tulu.model import build_model, router_aux_loss
from tulu.optim import build_optimizer
from tulu.preference import (PairLayout, build_preference_data, cached_logps, collate_dpo_pairs,
                             data_identity, evaluate_dpo, model_identity, pair_logps, pair_loss,
                             reference_cache)


@dataclasses.dataclass
class Args(ModelArgs, OptimArgs, HeadArgs, LogArgs, CheckpointArgs, PlanArgs):
    dataset_mixer_list: list[str] | None = None
    """Preference mixture as `name frac_or_count ...`: rows with `chosen` and `rejected` message lists that
    share the prompt and end in an assistant turn. Neither this nor --dataset_mixer: the embedded
    tulu/synth-pref."""
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
    load_balancing_weight: float = 0.001
    """Weight of the load-balancing loss (the original DPO's default: 0.001)."""
    # The optimizer flags keep the original's defaults (2e-5, warmup 0.03, 2 epochs, 8 pairs per device);
    # the Tulu 3 commands set 5e-7, warmup 0.1, 1 epoch, 128 pairs per step (presets tulu3_*_dpo).
    use_lora: bool = False
    """Accepted so the seed commands' `--use_lora False` translates; LoRA itself is not implemented."""


def plan(args: Args, mixer: dict) -> None:
    """--dry_run: the schedule and per-rank memory at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan, steps_line

    world = default_world(args.preset, args.dry_run_world_size)
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps, schedule = steps_line(count_rows(mixer), G, args.num_train_epochs, args.max_train_steps,
                                 args.warmup_ratio)
    needs_ref = DPO_LOSSES[args.dpo_loss_type].needs_reference
    lines = [("global batch", f"{G} pairs ({args.per_device_train_batch_size} x "
                              f"{args.gradient_accumulation_steps} x {world} ranks)"), *schedule,
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
        raise SystemExit("--use_lora True: LoRA is not implemented "
                         "(Tulu 3 trained every weight: --use_lora False)")
    mixer, given = training_mixer(args.dataset_mixer_list, args.dataset_mixer, embedded="tulu/synth-pref")
    if args.dry_run:
        return plan(args, mixer)
    d, stop, compute_dtype, attn = start_run(args)  # tulu.loop: process group, output_dir, stop, seed
    loss_type = DPO_LOSSES[args.dpo_loss_type]  # dispatch once
    use_cache = loss_type.needs_reference and args.reference_logprobs == "cache"
    tokenizer = args.load_tokenizer()
    eval_mixer = {"tulu/synth-pref-eval": 1.0} if not given else None  # the embedded default's held-out pairs
    if args.dataset_eval_mixer_list:
        eval_mixer = parse_mixer(args.dataset_eval_mixer_list)
    data_kw = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, skip_bad_rows=args.skip_bad_rows,
                   num_proc=args.preprocessing_num_workers, is_main=d.is_main)
    data = build_preference_data(mixer, mix_dir=args.dataset_mix_dir, **data_kw)
    eval_data = (build_preference_data(eval_mixer, split=args.dataset_eval_split, **data_kw)
                 if eval_mixer else None)
    model_kw = dict(revision=args.model_revision, vocab_size=len(tokenizer), attn_implementation=attn,
                    compute_dtype=compute_dtype, cpu_offload=args.cpu_offload,
                    reshard_after_forward=args.reshard_after_forward, seed=args.seed)
    model = build_model(args.model_name_or_path, d.device, gradient_checkpointing=args.gradient_checkpointing,
                        **model_kw)
    # Before any forward: a no-grad forward swaps the lm_head unit's Parameter for an unsharded one that
    # the root's reshard() does not swap back (measured, torch 2.13; tulu.fsdp.reshard does); an optimizer
    # built then would hold that stale object and never update lm_head.
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    modules = {"model": (model, optimizer)}  # what a checkpoint holds

    # ---- the reference: a cache scored by the initial policy itself, a live frozen copy, or nothing (simpo)
    layout = PairLayout(args.per_device_train_batch_size, args.packing, tokenizer.pad_token_id,
                        args.chunked_lm_head)
    reference, tables = None, {}
    if use_cache:
        # The policy has not taken a step yet, so it IS the reference: scoring with it needs no second
        # model at all (dpo_tune_cache.py did the same). Keyed by the tokenized data, the weight files
        # and the numerics; sums and averages are both stored, so every loss type reuses it.
        # A resumed run scores (or reuses) the cache here too: the checkpoint loads only further down.
        key = {"model": model_identity(model.name_or_path), "dtype": compute_dtype, "attn": attn,
               "vocab": len(tokenizer), "chunked_lm_head": args.chunked_lm_head}
        for name, ds in (("train", data), ("eval", eval_data)):
            if ds is not None:
                folder = Path(args.output_dir) / "reference_logprobs" / name
                tables[name] = reference_cache(model, ds, folder, {**key, "data": data_identity(ds)}, d,
                                               layout)
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
        with no_grad_forward(reference):
            return pair_logps(reference, batch, d.device, args.chunked_lm_head)

    global_batch, steps_per_epoch, total_steps, scheduler = args.schedule(optimizer, len(data), d.world)
    batches_of = StepBatches(data.lengths, args.seed, global_batch, d.rank, d.world,
                             args.per_device_train_batch_size, args.gradient_accumulation_steps, args.packing)
    # The newest complete checkpoint under output_dir, if any (any world size): weights, AdamW state,
    # the schedule and the data position, so the loss curve continues exactly.
    start_step = maybe_resume(args, modules, [scheduler], global_batch, d)
    metrics, eval_log = run_metrics(args, d)  # training lines, and eval lines apart from them
    beta = args.dpo_beta
    if beta is None:  # the loss type's own default: Tulu 3's 5 for dpo_norm, the original's 0.1 otherwise
        beta = 5.0 if args.dpo_loss_type == "dpo_norm" else 0.1
    loss_kw = dict(loss_type=loss_type, beta=beta, gamma_beta_ratio=args.dpo_gamma_beta_ratio,
                   label_smoothing=args.dpo_label_smoothing)
    print0(f"[dpo] {len(data)} pairs (dropped {data.dropped} truncated, skipped {data.skipped} bad), "
           f"{len(eval_data) if eval_data else 0} eval pairs, "
           f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, world {d.world}, "
           f"global batch {global_batch} pairs, {total_steps} steps, loss {args.dpo_loss_type} "
           f"beta {beta}, reference {args.reference_logprobs if loss_type.needs_reference else 'none'}, "
           f"packing={args.packing}, dtype={compute_dtype}")

    def run_eval(step: int) -> None:
        out = evaluate_dpo(model, eval_data, lambda idxs, batch: reference_logps("eval", idxs, batch),
                           loss_kw, d, layout)
        eval_log.log(step, out)
        if d.is_main:
            (Path(args.output_dir) / "eval_results.json").write_text(
                json.dumps({"step": step, **out}, indent=1))
            tqdm.write(f"eval step {step}: loss {out['eval/loss']:.4f} rewards/accuracy "
                       f"{out['eval/rewards/accuracy']:.3f} rewards/margin {out['eval/rewards/margin']:.4f}")

    # A pair = chosen + rejected tokens; with no truncation length, the longest pair bounds a row.
    pair_len = 2 * args.max_seq_length if args.max_seq_length else int(data.lengths.max())
    capacity = args.per_device_train_batch_size * pair_len
    flops_tok, peak = model_flops_per_token(model, pair_len // 2), peak_flops(d.device)
    throughput = Throughput()
    stopping = False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc="dpo", mininterval=5,
                     initial=start_step, total=total_steps):
        _, mbs = batches_of(step, capacity)  # this rank's micro-batches (row ids) of the step's global batch
        for mb in mbs:
            batch = collate_dpo_pairs(data.rows(mb), layout.pad_id, args.packing)  # on the host
            # (B,) x 4: summed and averaged log-probs of both sides, from one forward
            with router_aux_loss(model, args.load_balancing_loss) as aux:  # MoE: the router's loss
                policy = pair_logps(model, batch, d.device, args.chunked_lm_head)
            # Σ over the micro-batch's pairs (a live reference runs its own no-grad forward here)
            loss, m = pair_loss(policy=policy, reference=reference_logps("train", mb, batch), **loss_kw)
            # The one normalization (tulu.losses.micro_batch_weight): every pair of the step weighs 1/G, and
            # FSDP sums the ranks' gradients. G is fixed (step_samples wraps): no collective before backward.
            # An empty micro-batch (a dummy row, to join FSDP's collectives) has weight 0 in metrics too.
            weight, _ = micro_batch_weight(len(mb), global_count=global_batch)
            balance = load_balancing_loss(aux if mb else [], args.load_balancing_weight, len(mbs), d.world)
            (weight * loss + balance).backward()  # each FSDP unit's reduce-scatter runs in here
            for name, value in m.items():  # sums over the pairs: logged per pair
                metrics.add(f"train/{name}", value if mb else torch.zeros_like(value), len(mb))
            if aux:  # the original logged weight · aux, averaged (a dummy row counts for nothing)
                metrics.add("train/aux_loss", args.load_balancing_weight * aux[0].detach() * bool(mb), bool(mb))
            tokens, slots = batch_tokens(batch)
            throughput.add(tokens if mb else 0, slots)  # host integers: no sync
        # The global gradient norm is an all-reduce over ranks; it stays on the device until a log step.
        metrics.add("train/grad_norm", clip_and_step(model, optimizer, scheduler, args.clip_grad_norm))
        # Sync point: whether any rank got SIGTERM, agreed by all: a host tensor over gloo, so it never
        # waits for the device's queue of work.
        stopping = stop.agreed()

        # The log step is the one host sync of the loop: one all-reduce of every metric, then .tolist().
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            seconds, tps, padding = throughput.lap()
            tokens = [(tps * seconds, flops_tok)]  # the live reference's forward counts; a cache cost nothing
            extra = {"train/lr": scheduler.get_last_lr()[0], "train/epoch": step / steps_per_epoch,
                     "perf/tokens_per_s_per_device": tps, "perf/padding_fraction": padding,
                     **mfu(tokens, tokens if reference else [], seconds, peak)}
            out = metrics.log(step + 1, extra)
            if d.is_main:
                tqdm.write(f"step {step + 1}/{total_steps} loss {out['train/loss']:.4f} "
                           f"acc {out['train/rewards/accuracy']:.3f} "
                           f"margin {out['train/rewards/margin']:.4f} "
                           f"lr {extra['train/lr']:.2e} tok/s/dev {tps:.0f}")
        if (eval_data is not None and args.eval_steps and (step + 1) % args.eval_steps == 0
                and step + 1 < total_steps):
            run_eval(step + 1)  # collective: every rank scores its share of the held-out pairs
        # A checkpoint when --checkpointing_steps says so or on a stop request (every rank writes its
        # own rows; rank 0 marks it COMPLETE last, so a crash mid-save never looks complete).
        maybe_save(args, step + 1, steps_per_epoch, stopping, modules, global_batch, d,
                   lambda folder: export_hf(model, tokenizer, folder, d.is_main))
        if stopping:
            break
    if not stopping and eval_data is not None:
        run_eval(total_steps)
    # The final Hugging Face export gathers each parameter in turn (a collective on every rank).
    finish("dpo", stopping, model, tokenizer, args.output_dir, d.is_main)


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
    shutdown()  # main's models are freed: destroy the process group, exit without interpreter teardown
