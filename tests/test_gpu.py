"""CUDA-only checks of what gloo on CPU cannot exercise (skipped without a GPU; run by the GPU suite's
`tests` section): host tensors in collectives under nccl. With --cpu_offload the gradients live on the
host, so clip_grad_norm_ reduces host tensors; the DPO reference cache agrees on reuse with a collective.
Both need the default group's gloo half (`cpu:gloo,cuda:nccl`, tulu.dist.init_dist)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import read_metrics, torchrun

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_offloaded_sft_then_cached_reference_dpo_on_cuda(tmp_path):
    sft = tmp_path / "sft"
    torchrun("train/sft.py", ["--output_dir", str(sft), "--max_train_steps", "3", "--logging_steps", "1",
                              "--cpu_offload", "--mixed_precision", "bf16"], nproc=1)
    logged = read_metrics(sft)
    assert len(logged) == 3 and all(math.isfinite(m["train/grad_norm"]) and m["train/grad_norm"] > 0 for m in logged)
    dpo = tmp_path / "dpo"
    for _ in range(2):  # the second run reuses the cache
        proc = torchrun("train/dpo.py", ["--model_name_or_path", str(sft), "--preset", "tiny", "--output_dir", str(dpo),
                                         "--max_train_steps", "2", "--reference_logprobs", "cache",
                                         "--cpu_offload", "--mixed_precision", "bf16"], nproc=1)
    assert "reusing reference log-prob cache" in proc.stdout
    assert all(math.isfinite(m["train/loss"]) for m in read_metrics(dpo) if "train/loss" in m)


def test_torch_engine_samples_on_cuda_reproducibly():
    """TorchEngine on the GPU: seeded sampling (per-row CUDA generators) repeats itself exactly."""
    from rollout.engine import SamplingParams, TorchEngine
    from tulu.tiny import tiny_dir

    engine = TorchEngine(str(tiny_dir()), device="cuda")
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3)
    a, b = engine.generate([[5, 6, 7]] * 2, params), engine.generate([[5, 6, 7]] * 2, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert all(len(c.token_ids) > 0 for g in a for c in g)
