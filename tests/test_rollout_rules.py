"""The rules the rollout pool and the weight sync apply before anything runs: GPU and CPU placement
of local engines, the sync backend, matching versions, sampling limits (one set for both engines)."""
from __future__ import annotations

import pytest

from rollout.engine import SEED_STRIDE, SamplingParams, row_seed
from rollout.groups import check_versions, runtime_versions, sync_backend
from rollout.pool import engine_cores, engine_gpus


def test_engines_get_the_gpus_after_the_trainer_ranks():
    # Tulu 3 8B: 7 learner ranks + 1 engine on one 8-GPU node -> the engine gets GPU 7, not GPU 0.
    assert engine_gpus(1, 1, 7, None, 8) == ["7"]
    assert engine_gpus(2, 2, 4, None, 8) == ["4,5", "6,7"]
    # Numbered through the parent's CUDA_VISIBLE_DEVICES: local rank r holds its r-th entry.
    assert engine_gpus(2, 1, 2, "3,5,6,7", 8) == ["6", "7"]
    assert engine_gpus(1, 2, 0, "GPU-a,GPU-b", 2) == ["GPU-a,GPU-b"]  # UUIDs pass through
    every = [g for gs in engine_gpus(3, 2, 2, None, 8) for g in gs.split(",")]
    assert len(set(every)) == len(every) and not set(every) & {"0", "1"}  # no overlap with anyone
    with pytest.raises(ValueError, match=r"need 9 GPUs; this node has 8"):
        engine_gpus(1, 1, 8, None, 8)  # 8 learners + 1 engine do not fit on 8 GPUs: an error, not sharing
    with pytest.raises(ValueError, match=r"need 4 GPUs; this node has 3"):
        engine_gpus(1, 2, 2, "0,1,2", 8)


def test_cpu_engines_get_cores_of_their_own():
    assert engine_cores(2, 1, 1, [0, 1]) == ["1", "0"]  # vLLM's "auto" would bind both to core 0
    assert engine_cores(1, 4, 2, list(range(8))) == ["4,5|6,7"]  # one list per TP worker
    assert engine_cores(2, 2, 1, list(range(8))) == ["6,7", "4,5"]
    assert engine_cores(3, 1, 1, [0, 1]) == ["nobind"] * 3  # cores do not go round: unbound threads


def test_sync_backend_follows_where_the_weights_live():
    assert sync_backend(None, True, {"e0": "cuda", "e1": "cuda"}) == "nccl"
    assert sync_backend(None, True, {"e0": "cuda", "e1": "cpu"}) == "gloo"  # a host engine: NCCL cannot reach it
    assert sync_backend(None, False, {"e0": "cuda"}) == "gloo"
    assert sync_backend("gloo", True, {"e0": "cuda"}) == "gloo"  # e.g. trainer and engine on one GPU
    with pytest.raises(ValueError, match=r"engines on the host: \['e1'\]"):
        sync_backend("nccl", True, {"e0": "cuda", "e1": "cpu"})
    with pytest.raises(ValueError, match="nccl or gloo"):
        sync_backend("mpi", True, {})


def test_versions_must_match():
    mine = {"torch": "2.13.0+cpu", "nccl": None, "vllm": "0.32.0"}
    check_versions(mine, [("e0", dict(mine)), ("e1", {**mine, "vllm": None})])  # a TorchEngine env without vllm
    theirs = {"torch": "2.14.0", "nccl": "2.30.7", "vllm": "0.33.0"}
    with pytest.raises(RuntimeError, match=r"e1 runs torch 2.14.0 \(trainer: 2.13.0\+cpu\), vllm 0.33.0 \(trainer: 0.32.0\)"):
        check_versions(mine, [("e0", mine), ("e1", theirs)])
    with pytest.raises(RuntimeError, match="nccl 2.30.7"):
        check_versions({"torch": "2.13.0", "nccl": "2.29.7", "vllm": None}, [("e0", {"torch": "2.13.0", "nccl": "2.30.7"})])
    with pytest.raises(RuntimeError, match="e0 reported no versions"):
        check_versions(mine, [("e0", None)])
    here = runtime_versions()
    import torch

    assert here["torch"] == torch.__version__


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
    (dict(temperature=0.0, n=4), "greedy sampling .* n must be 1"),
    (dict(n=0), r"n must be an integer in \[1,"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
])
def test_sampling_limits_are_one_rule_for_both_engines(kwargs, message):
    with pytest.raises(ValueError, match="SamplingParams: " + message):
        SamplingParams(**kwargs)


def test_completion_seeds_never_collide():
    """Per-prompt seed + i and vLLM's per-sample seed + j would collide (sample j of prompt i =
    sample 0 of prompt i + j); every (prompt, sample) pair gets a seed of its own."""
    seeds = {row_seed(7, i, j) for i in range(300) for j in range(64)}
    assert len(seeds) == 300 * 64
    assert row_seed(7, 1, 0) != row_seed(7, 0, 1)
    assert SamplingParams(n=SEED_STRIDE - 1).n == SEED_STRIDE - 1
