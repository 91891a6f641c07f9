"""Weight-sync correctness on the tiny model: trainer (FSDP, 1 or more ranks) -> rollout engines.

    python tests/scripts/rollout_sync_check.py --engines 1                       # world of one
    torchrun --standalone --nproc_per_node 2 tests/scripts/rollout_sync_check.py --engines 2
    ... --engine vllm --tol 1e-3                                                 # on a GPU
    ... --model DIR                           # another model folder (tests: a tied-embedding copy)

Checks, in one launch: engines that loaded the checkpoint are stale after a training step (the
check can fail); after a push their sampled tokens' log-probs equal the trainer's (fp32, ≤ tol) and
their version equals the trainer's step; after another step and push the log-probs move and match
again; the per-parameter path gives the same parity; a push while a background thread generates (async
mode) neither deadlocks nor mixes versions within a completion; train/rlvr.py's sync check passes
after a sync and names every engine once they miss one. Prints one JSON line and ROLLOUT_SYNC_OK.
"""
from __future__ import annotations

import argparse
import json
import threading

import torch

from rollout.engine import SamplingParams
from rollout.pool import EnginePool
from rollout.weight_sync import WeightSync
from tulu.dist import broadcast_object, init_dist, print0, shutdown
from tulu.model import build_model
from tulu.ops import logprobs_from_logits
from tulu.optim import build_optimizer
from tulu.rl_batch import EngineOutOfSync, check_engines_in_sync, engine_sync_gaps
from tulu.tiny import TINY_NAME, tiny_dir


@torch.no_grad()
def trainer_logprobs(model, prompts, groups, temperature, device) -> list[list[torch.Tensor]]:
    """The trainer's log-probs of each completion, one unpadded sequence at a time (all ranks)."""
    out = []
    for prompt, comps in zip(prompts, groups):
        row = []
        for c in comps:
            ids = torch.tensor([prompt + c.token_ids], device=device)  # (1, P + T)
            logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]  # (1, T, V)
            row.append(logprobs_from_logits(logits, torch.tensor([c.token_ids], device=device), temperature)[0].cpu())
        out.append(row)
    return out


def max_diff(groups, trainer) -> float:
    return max((torch.tensor(c.logprobs) - t).abs().max().item() for cs, ts in zip(groups, trainer) for c, t in zip(cs, ts))


def train_step(model, opt, step: int, device) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(3, 300, (4, 24), generator=g).to(device)  # (B, T) same batch on every rank
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (model(input_ids=x, labels=x).loss / world).backward()  # FSDP sums the ranks' gradients (apply_fsdp)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--engine", default="torch")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--sync-backend", default=None, help="gloo|nccl (default: nccl on GPU); gloo when trainer and engine share one GPU")
    p.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    p.add_argument("--bucket-mb", type=float, default=0.25)  # small: the tiny model spans several buckets
    args = p.parse_args()
    d = init_dist()
    torch.set_num_threads(1)  # tiny model: more threads only contend with the engines for 2 cores
    model = build_model(args.model or TINY_NAME, d.device, compute_dtype="fp32")
    opt = build_optimizer(model, lr=1e-2)
    engine_args = ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3"] if args.engine == "vllm" else []
    pool = (EnginePool.start(args.model or str(tiny_dir()), args.engines, engine=args.engine, threads=1, engine_args=engine_args,
                             start_timeout_s=600, timeout_s=120) if d.is_main else None)
    sync = WeightSync(pool, backend=args.sync_backend, bucket_mb=args.bucket_mb, timeout_s=120)
    prompts = [[2, 20 + i, 31, 42, 53 + i][: 3 + i % 3] for i in range(6)]
    sp = SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=7, stop_token_ids=())
    res = {"world": d.world, "engines": args.engines, "engine": args.engine}

    def generate_and_score(tag: str):
        groups = broadcast_object(pool.generate(prompts, sp) if d.is_main else None)
        trainer = trainer_logprobs(model, prompts, groups, sp.temperature, d.device)
        res[f"diff_{tag}"] = max_diff(groups, trainer)
        res[f"versions_{tag}"] = sorted({c.version for cs in groups for c in cs})
        return groups, trainer

    train_step(model, opt, 0, d.device)  # the engines hold the checkpoint; the trainer has moved on
    generate_and_score("stale")
    assert res["diff_stale"] > 1e-3, f"engines should be stale before the first sync: {res}"

    res["sync1"] = sync.push(model, version=1)
    groups1, trainer1 = generate_and_score("v1")
    assert res["diff_v1"] <= args.tol and res["versions_v1"] == [1], res

    train_step(model, opt, 1, d.device)
    moved = trainer_logprobs(model, prompts, groups1, sp.temperature, d.device)
    res["trainer_moved"] = max_diff(groups1, moved)
    res["sync2"] = sync.push(model, version=2)
    groups2, _ = generate_and_score("v2")
    res["engine_moved"] = max(
        (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item() if a.token_ids == b.token_ids else 1.0
        for ga, gb in zip(groups1, groups2) for a, b in zip(ga, gb))
    assert res["trainer_moved"] > 1e-3 and res["engine_moved"] > 1e-3, res
    assert res["diff_v2"] <= args.tol and res["versions_v2"] == [2], res
    if d.is_main:
        assert pool.versions == [2] * args.engines, pool.versions

    res["sync3"] = sync.push(model, version=3, per_param=True)  # the original's path, same parity
    generate_and_score("v3_per_param")
    assert res["diff_v3_per_param"] <= args.tol and res["versions_v3_per_param"] == [3], res

    # Async mode: generation in a background thread while every rank pushes the next version. The
    # push waits for the generate on each engine; each completion names the version that made it.
    background: list = []
    if d.is_main:
        thread = threading.Thread(target=lambda: background.append(pool.generate(prompts, sp)))
        thread.start()
    res["sync4"] = sync.push(model, version=4)
    if d.is_main:
        thread.join(timeout=120)
        res["versions_async"] = sorted({c.version for cs in background[0] for c in cs})
        assert set(res["versions_async"]) <= {3, 4} and pool.versions == [4] * args.engines, (res, pool.versions)
    generate_and_score("v4")
    assert res["diff_v4"] <= args.tol and res["versions_v4"] == [4], res

    # train/rlvr.py's sync check (a fixed probe, every engine on its own): quiet after a sync, and
    # a named error once the engines miss one.
    probe_params = SamplingParams(n=1, temperature=0.8, max_tokens=8, seed=3, stop_token_ids=())
    gaps = engine_sync_gaps(pool, d, model, prompts[:3], probe_params, 0, 0.8)
    check_engines_in_sync(gaps, 1e-3, 4)
    res["sync_check_gap"] = max(gaps.values())
    train_step(model, opt, 4, d.device)  # ...and no push: every engine is now stale
    stale = engine_sync_gaps(pool, d, model, prompts[:3], probe_params, 0, 0.8)
    try:
        check_engines_in_sync(stale, 1e-3, 5)
        res["sync_check_error"] = None
    except EngineOutOfSync as e:
        res["sync_check_error"] = str(e)
    res["sync_check_stale_gap"] = min(stale.values())

    sync.close()
    if d.is_main:
        pool.shutdown()
    print0(json.dumps(res))
    print0("ROLLOUT_SYNC_OK")
    del model, opt
    shutdown()


if __name__ == "__main__":
    main()
