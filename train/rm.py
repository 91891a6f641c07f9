"""Reward modeling (Tulu 3 RM stage): a scalar head on the SFT model, Bradley–Terry loss on preference pairs.

Embedded default (CPU, nothing downloaded): synthetic arithmetic pairs (chosen = the correct answer,
rejected = a wrong one), held-out accuracy on tulu/synth-pref-eval. Start it from an SFT export:
    torchrun --standalone --nproc_per_node 2 train/sft.py --output_dir output/sft
    torchrun --standalone --nproc_per_node 2 train/rm.py --model_name_or_path output/sft \
      --output_dir output/rm

Tulu 3 8B RM (open-instruct docs/tulu3.md; 1 node x 8 GPUs; the optimizer flags the seed command
left at their defaults are spelled out):
    torchrun --nproc_per_node 8 train/rm.py \
      --model_name_or_path allenai/Llama-3.1-Tulu-3-8B-SFT --chat_template tulu \
      --dataset_mixer '{"allenai/llama-3.1-tulu-3-8b-preference-mixture": 1.0}' --dataset_train_splits train \
      --dataset_eval_mixer '{"allenai/ultrafeedback_binarized_cleaned": 1.0}' \
      --dataset_eval_splits test_prefs \
      --max_token_length 2048 --max_prompt_token_length 2048 --per_device_train_batch_size 1 \
      --per_device_eval_batch_size 1 --gradient_accumulation_steps 32 --learning_rate 3e-6 \
      --lr_scheduler_type linear --warmup_ratio 0 --num_train_epochs 1 --eps 1e-5 --weight_decay 0.01 \
      --packing False --gradient_checkpointing --seed 1 --output_dir output/rm_8b --with_tracking

The export is a Hugging Face `*ForSequenceClassification` folder (num_labels=1, pad_token_id set):
`AutoModelForSequenceClassification.from_pretrained(output_dir)` loads it, and train/rlvr.py takes it
as --reward_model_path and as the value model's initialization.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from tulu.checkpoint import maybe_resume, maybe_save
from tulu.config import CheckpointArgs, LogArgs, ModelArgs, OptimArgs, PlanArgs, cli
from tulu.data import StepBatches
from tulu.dist import entrypoint, print0, shutdown
from tulu.export import export_hf
from tulu.loop import Throughput, batch_tokens, clip_and_step, finish, start_run
from tulu.losses import bradley_terry_loss, micro_batch_weight
from tulu.metrics import mfu, model_flops_per_token, peak_flops, run_metrics
from tulu.mixer import parse_mixer, training_mixer
from tulu.model import build_model
from tulu.optim import build_optimizer
from tulu.reward import build_pref_data, collate_rm_pairs, evaluate_rm, last_token_scores, score_head_init


@dataclasses.dataclass
class Args(ModelArgs, OptimArgs, LogArgs, CheckpointArgs, PlanArgs):
    dataset_mixer: str | None = None
    """Training mixture as a JSON dict {"name": frac_or_count} (a value with "." is a fraction, else a
    row count); sources are concatenated in order without shuffling (the original's combine_dataset).
    Neither this nor --dataset_mixer_list given: the embedded tulu/synth-pref (and tulu/synth-pref-eval)."""
    dataset_mixer_list: list[str] | None = None
    """Training mixture as `name frac_or_count ...`."""
    dataset_train_splits: list[str] = dataclasses.field(default_factory=lambda: ["train"])
    """Split of each training dataset (one value applies to all)."""
    dataset_eval_mixer: str | None = None
    """Eval mixture as a JSON dict (all of it is evaluated; the original cut it to 100 pairs)."""
    dataset_eval_splits: list[str] = dataclasses.field(default_factory=lambda: ["test"])
    """Split of each eval dataset (one value applies to all)."""
    chat_template: str | None = None
    """The original RM's name for --chat_template_name (takes precedence when given)."""
    max_token_length: int | None = None
    """Drop pairs whose chosen or rejected conversation is longer (tokens); nothing is truncated. None:
    no limit (the original's default; Tulu 3: 2048; the tiny preset: 256)."""
    max_prompt_token_length: int | None = None
    """Drop pairs whose prompt (all but the final assistant turn) is longer (tokens). None: no limit (the
    original's default; Tulu 3: 2048; the tiny preset: 128)."""
    per_device_eval_batch_size: int = 1
    """Preference pairs per eval micro-batch per rank (the original's default)."""
    eval_steps: int | None = None
    """Evaluate every this many optimizer steps (always once at the end when an eval mixture exists)."""
    packing: bool = True
    """Padding-free rows (score at each document's last token), each holding at most the tokens of a
    padded micro-batch of per_device_train_batch_size of the step's longest pair. False: right-padded."""
    preprocessing_num_workers: int | None = None
    """Processes for tokenization (cached on disk, keyed by data, tokenizer, template and lengths)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping with an error naming the row and field."""
    # Optimizer: the original RM's defaults (torch AdamW), which the Tulu 3 command relied on.
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (torch's default, which the original kept; 1-D parameters never
    decay)."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps spent warming up linearly from 0 (the original RM had none)."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate (the original's default; Tulu 3 8B: 3e-6; the tiny preset: 1e-3)."""
    per_device_train_batch_size: int = 1
    """Preference pairs per micro-batch per rank (the original RM's default)."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step per rank (the original RM's default; Tulu 3: 32)."""
    num_train_epochs: int = 1
    """Passes over the training data."""
    seed: int = 1
    """Seed for data order, the score head's init and every RNG the run draws from (original default 1)."""


def plan(args: Args, mixer: dict) -> None:
    """--dry_run: the schedule and per-rank memory at --dry_run_world_size, then exit."""
    from tulu.plan import StepPlan, count_rows, default_world, print_plan, steps_line

    world = default_world(args.preset, args.dry_run_world_size)
    G = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps, schedule = steps_line(count_rows(mixer, args.dataset_train_splits[0]), G, args.num_train_epochs,
                                 args.max_train_steps, args.warmup_ratio)
    lines = [("global batch", f"{G} pairs ({args.per_device_train_batch_size} x "
                              f"{args.gradient_accumulation_steps} x {world} ranks)"),
             ("tokens / step (at most)", 2 * G * (args.max_token_length or 0)),
             *schedule]
    step = StepPlan(args.max_token_length and 2 * args.per_device_train_batch_size * args.max_token_length,
                    checkpointing=args.gradient_checkpointing, repeat_kv=not args.use_flash_attn,
                    mixed_precision=args.mixed_precision)
    print_plan("rm", world=world, preset=args.preset, cpu_offload=args.cpu_offload, lines=lines,
               models={"reward model": (args.model_name_or_path, "reward", True)}, step=step)


@entrypoint  # one rank's crash: its traceback shown once, every rank stopped
def main(args: Args) -> None:
    mixer, given = training_mixer(args.dataset_mixer_list, args.dataset_mixer, embedded="tulu/synth-pref")
    if args.dry_run:
        return plan(args, mixer)
    d, stop, compute_dtype, attn = start_run(args)  # tulu.loop: process group, output_dir, stop, seed
    tokenizer = args.load_tokenizer(args.chat_template)  # --chat_template: the original RM's name
    eval_mixer = {"tulu/synth-pref-eval": 1.0} if not given else None  # the embedded default's held-out pairs
    if args.dataset_eval_mixer:
        eval_mixer = parse_mixer(mixer=args.dataset_eval_mixer)
    limits = (args.max_token_length, args.max_prompt_token_length, args.skip_bad_rows)
    data = build_pref_data(mixer, args.dataset_train_splits, tokenizer, *limits,
                           args.preprocessing_num_workers, d.is_main)
    eval_data = (build_pref_data(eval_mixer, args.dataset_eval_splits, tokenizer, *limits,
                                 args.preprocessing_num_workers, d.is_main) if eval_mixer else None)
    for split, ds in (("train", data), ("eval", eval_data)):
        if ds is not None:
            print0(f"[rm] {split}: {len(ds)} pairs kept; {ds.dropped} dropped (chosen/rejected over "
                   f"{args.max_token_length} tokens or prompt over {args.max_prompt_token_length}); "
                   f"{ds.skipped} bad rows skipped")

    # Built on the meta device, sharded, then each rank reads only its own rows; the score head (absent
    # from a causal-LM checkpoint) is drawn from score_head_init, the same on every rank.
    model = build_model(args.model_name_or_path, d.device, kind="reward", revision=args.model_revision,
                        vocab_size=len(tokenizer), attn_implementation=attn,
                        compute_dtype=compute_dtype, cpu_offload=args.cpu_offload,
                        reshard_after_forward=args.reshard_after_forward,
                        gradient_checkpointing=args.gradient_checkpointing,
                        init_missing=score_head_init(args.seed), seed=args.seed)
    # HF's pooling inside forward (whose result we ignore) refuses batches > 1 without a pad id, and
    # the export needs it for anyone who scores through HF's own forward.
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, eps=args.eps)
    modules = {"model": (model, optimizer)}  # what a checkpoint holds

    global_batch, steps_per_epoch, total_steps, scheduler = args.schedule(optimizer, len(data), d.world)
    batches_of = StepBatches(data.lengths, args.seed, global_batch, d.rank, d.world,
                             args.per_device_train_batch_size, args.gradient_accumulation_steps, args.packing)
    # The newest complete checkpoint under output_dir, if any (any world size): weights, AdamW state,
    # the schedule and the data position, so the loss curve continues exactly.
    start_step = maybe_resume(args, modules, [scheduler], global_batch, d)
    metrics, eval_log = run_metrics(args, d)  # training lines, and eval lines apart from them
    print0(f"[rm] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, world {d.world}, "
           f"global batch {global_batch} pairs, {total_steps} steps, packing={args.packing}, "
           f"dtype={compute_dtype}")

    def run_eval(step: int) -> None:
        results, scores = evaluate_rm(model, eval_data, tokenizer.pad_token_id, d,
                                      args.per_device_eval_batch_size, args.packing)
        out = eval_log.log(step, {f"eval/rm/{k}": v for k, v in results.items()})
        print0(f"[rm] eval step {step}: accuracy {results['accuracy']:.4f} loss {results['loss']:.4f}")
        if d.is_main:
            Path(args.output_dir, "eval_results.json").write_text(
                json.dumps({"step": step, "pairs": len(eval_data), **out}, indent=2))
            # per pair, for analysis and tests
            with open(Path(args.output_dir, "eval_scores.jsonl"), "w") as f:
                for pair_id, (c, r) in zip(eval_data.ds["id"], scores.tolist()):
                    f.write(json.dumps({"id": pair_id, "chosen_score": c, "rejected_score": r}) + "\n")

    flops_tok = model_flops_per_token(model, args.max_token_length or int(data.lengths.max()))
    peak = peak_flops(d.device)
    throughput = Throughput()
    # A packed micro-batch holds no more tokens than the padded one of per_device pairs would.
    capacity = lambda samples: args.per_device_train_batch_size * int(data.lengths[samples].max())  # noqa: E731
    stopping = False
    for step in tqdm(range(start_step, total_steps), disable=not d.is_main, desc="rm", mininterval=5,
                     initial=start_step, total=total_steps):
        _, mbs = batches_of(step, capacity)  # this rank's micro-batches (row ids) of the step's global batch
        batches = [collate_rm_pairs(data.rows(mb), tokenizer.pad_token_id, args.packing) for mb in mbs]  # host
        for batch in batches:
            scores = last_token_scores(model, batch, d.device)  # (2n,) chosen then rejected
            n = batch["pairs"]
            # A dummy row (n = 0) still runs backward, with weight 0, to join FSDP's collectives.
            chosen, rejected = (scores[:n], scores[n:]) if n else (scores[:1] * 0, scores[:1] * 0)
            loss, m = bradley_terry_loss(chosen, rejected)  # sums over the n pairs
            # The one normalization (tulu.losses.micro_batch_weight): every pair of the step weighs 1/G
            # (the pair count is G on every step by construction: no collective), FSDP sums the ranks.
            weight, _ = micro_batch_weight(n, global_count=global_batch)
            (weight * loss).backward()  # each FSDP unit's reduce-scatter (a collective) runs in here
            for k, v in m.items():  # logged per pair (a dummy row's values count for nothing)
                metrics.add(f"train/rm/{k}", v if n else torch.zeros_like(v), n)
            throughput.add(*batch_tokens(batch))  # host integers: no sync
        # The global gradient norm is an all-reduce over ranks; it stays on the device until a log step.
        metrics.add("train/grad_norm", clip_and_step(model, optimizer, scheduler, args.clip_grad_norm))
        # Sync point: whether any rank got SIGTERM, agreed by all: a host tensor over gloo, so it never
        # waits for the device's queue of work.
        stopping = stop.agreed()

        # The log step is the one host sync of the loop: one all-reduce of every metric, then .tolist().
        if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
            seconds, tps, _ = throughput.lap()
            out = metrics.log(step + 1, {"train/lr": scheduler.get_last_lr()[0],
                                         "train/epoch": step / steps_per_epoch,
                                         "perf/tokens_per_s_per_device": tps,
                                         **mfu([(tps * seconds, flops_tok)], [], seconds, peak)})
            if d.is_main:
                tqdm.write(f"step {step + 1}/{total_steps} loss {out['train/rm/loss']:.4f} accuracy "
                           f"{out['train/rm/accuracy']:.3f} margin {out['train/rm/margin']:.3f} "
                           f"lr {out['train/lr']:.2e} tok/s/dev {tps:.0f}")
        last = step + 1 == total_steps
        if eval_data is not None and ((args.eval_steps and (step + 1) % args.eval_steps == 0) or last):
            run_eval(step + 1)  # collective: every rank scores its share of the held-out pairs
        # A checkpoint when --checkpointing_steps says so or on a stop request (every rank writes its
        # own rows; rank 0 marks it COMPLETE last, so a crash mid-save never looks complete).
        maybe_save(args, step + 1, steps_per_epoch, stopping, modules, global_batch, d,
                   lambda folder: export_hf(model, tokenizer, folder, d.is_main))
        if stopping:
            break

    # The final Hugging Face export (export_hf records the HF class name) gathers each parameter in
    # turn: a collective on every rank.
    finish("rm", stopping, model, tokenizer, args.output_dir, d.is_main)


if __name__ == "__main__":
    main(cli(Args, description=__doc__))
    shutdown()  # main's models are freed: destroy the process group, exit without interpreter teardown
