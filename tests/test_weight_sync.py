"""Weight sync: bucket planning, and trainer -> engine log-prob parity after a sync with
a 1-rank and a 2-rank FSDP trainer (gloo, multi-process), plus the vLLM variant on one shared GPU
(tests/test_vllm.py has the vLLM checks that run on CPU too).

The multi-process checks live in tests/scripts/rollout_sync_check.py (one launch each, several
checks per launch); every launch runs under a subprocess timeout, so nothing here can hang."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout.weight_sync import ALIGN, plan_buckets

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "rollout_sync_check.py"


def test_plan_buckets_packs_in_order_within_the_size():
    specs = [("a", torch.float32, (10, 10)), ("b", torch.bfloat16, (3,)), ("c", torch.float32, (1000,)),
             ("d", torch.float32, ()), ("e", torch.float32, (40,))]
    slots, sizes = plan_buckets(specs, bucket_bytes=1024)
    assert [s.name for s in slots] == list("abcde")
    assert [s.bucket for s in slots] == [0, 0, 1, 2, 2]  # c (4000 B) is larger than a bucket: alone
    assert all(s.offset % ALIGN == 0 for s in slots)
    for b, size in enumerate(sizes):
        inside = [s for s in slots if s.bucket == b]
        assert all(x.offset + x.nbytes <= y.offset for x, y in zip(inside, inside[1:]))  # no overlap
        assert inside[-1].offset + inside[-1].nbytes <= size
        assert size <= 1024 or len(inside) == 1
    assert len(plan_buckets(specs, bucket_bytes=1)[1]) == len(specs)  # per-parameter = one bucket each


def run_check(cmd: list[str], timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0 and "ROLLOUT_SYNC_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def check_parity(res: dict, tol: float) -> None:
    assert res["diff_stale"] > 1e-3  # engines that missed a sync are caught
    for tag, version in (("v1", 1), ("v2", 2), ("v3_per_param", 3), ("v4", 4)):
        assert res[f"diff_{tag}"] <= tol and res[f"versions_{tag}"] == [version], res
    assert res["engine_moved"] > 1e-3 and res["trainer_moved"] > 1e-3
    assert set(res["versions_async"]) <= {3, 4}  # generation during a push: whole completions per version
    for k in ("sync1", "sync2", "sync3", "sync4"):
        assert {"gather_s", "broadcast_s", "load_s", "total_s"} <= res[k].keys()
    # the sync check: quiet after a sync, a named error (every engine, the step) after a missed one
    assert res["sync_check_gap"] <= max(tol, 1e-6) and res["sync_check_stale_gap"] > 1e-3, res
    error = res["sync_check_error"]
    assert error and "step 5" in error and all(f"engine-{i}" in error for i in range(res["engines"])), error


@pytest.mark.slow
def test_sync_single_rank_trainer_one_engine():
    res = run_check([sys.executable, str(SCRIPT), "--engines", "1"], timeout_s=180)
    check_parity(res, 1e-5)
    assert res["sync1"]["buckets"] > 1  # the tiny model spans several 0.25 MiB buckets


@pytest.mark.slow
def test_sync_fsdp_two_ranks_two_engines():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = run_check([torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--engines", "2"], timeout_s=240)
    check_parity(res, 1e-5)


@pytest.mark.slow
def test_sync_sends_the_engine_dtype_and_waits_out_a_long_generation():
    """One bf16 TorchEngine (what a vLLM engine holds) and an fp32 trainer (no dtype given):
    1. the engine receives bf16 (2 bytes per element) and then holds exactly the trainer's weights
       rounded to bf16 (same tokens and log-probs as an in-process bf16 engine loaded with them);
    2. a push issued while the engine generates for longer than the sync group's timeout (3 s) waits
       it out instead of dying in the group's broadcast;
    3. an engine busy for longer than the pool's timeout ends the push with EngineTimeout, naming it."""
    import threading
    import time

    from transformers import AutoModelForCausalLM

    from rollout.engine import SamplingParams, TorchEngine
    from rollout.errors import EngineTimeout
    from rollout.pool import EnginePool
    from rollout.weight_sync import WeightSync
    from tulu.tiny import tiny_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # fp32 values that bf16 cannot hold exactly
    pool = EnginePool.start(str(tiny_dir()), 1, threads=1, engine_args=["--dtype", "bf16"], start_timeout_s=120,
                            timeout_s=120)
    try:
        sync = WeightSync(pool, bucket_mb=0.25, timeout_s=3, log=False)
        stats = sync.push(model, version=1)
        numel = sum(p.numel() for p in model.parameters())
        assert stats["engine_dtypes"] == [["bfloat16"]] and stats["engine_bytes"] == [2 * numel], stats
        prompts = [[2, 10 + i, 11] for i in range(6)]
        sp = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=3, stop_token_ids=())
        local = TorchEngine(str(tiny_dir()), dtype="bf16")
        local.load_weights((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
        for got, want in zip(pool.generate(prompts, sp), local.generate(prompts, sp)):
            assert [c.token_ids for c in got] == [c.token_ids for c in want]
            assert [c.logprobs for c in got] == [c.logprobs for c in want]

        def background(out: list):
            try:
                out.append(pool.generate([[2, 5 + i, 9] for i in range(64)], long))
            except EngineTimeout as e:
                out.append(e)

        long = SamplingParams(temperature=1.0, max_tokens=500, seed=0, stop_token_ids=())  # ~7 s here
        done: list = []
        gen = threading.Thread(target=background, args=(done,))
        gen.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        sync.push(model, version=2)  # before: the group's 3 s broadcast timeout killed this push
        waited = time.monotonic() - t0
        gen.join()
        assert waited > 3 and pool.versions == [2], (waited, pool.versions)
        assert {c.version for g in done[0] for c in g} == {1}  # the whole batch came from version 1

        pool.timeout_s = 1.0  # a "hung" engine: busy for longer than the pool allows
        done = []
        gen = threading.Thread(target=background, args=(done,))
        gen.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        with pytest.raises(EngineTimeout, match=r"weight sync v3: waiting for \['engine-0'\]"):
            sync.push(model, version=3)
        assert time.monotonic() - t0 < 3
        gen.join()
        pool.timeout_s = 120
        sync.push(model, version=3)  # the engine finishes that generation, then takes the weights
        assert pool.versions == [3]
        sync.close()
    finally:
        pool.shutdown()
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_an_engine_from_another_environment_is_refused_before_any_collective():
    """Engines report torch / NCCL / vLLM versions when they join; WeightSync refuses a mismatch
    with a message naming it, before it builds the group (the engine keeps serving)."""
    from rollout.groups import runtime_versions
    from rollout.pool import EnginePool
    from rollout.weight_sync import WeightSync
    from tulu.tiny import tiny_dir

    pool = EnginePool.start(str(tiny_dir()), 1, threads=1, start_timeout_s=120, timeout_s=60)
    try:
        engine = pool.engines[0]
        assert engine.runtime == runtime_versions() and engine.device == "cpu"  # one interpreter, one report
        engine.runtime = {**engine.runtime, "torch": "2.14.0"}  # as an engine started from another venv reports
        with pytest.raises(RuntimeError, match=r"engine-0 runs torch 2.14.0 \(trainer: "):
            WeightSync(pool, timeout_s=5)
        assert pool.call(engine, "ping").result(timeout=5)["version"] == 0
    finally:
        pool.shutdown()


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _has_vllm(), reason="needs a CUDA GPU and vllm")
def test_sync_vllm_engine_parity():
    # fp32 engine; vLLM's attention kernels differ from sdpa's, hence a looser bound than the torch engine's.
    # One GPU: trainer and engine share it, and NCCL refuses two ranks on one device, so gloo carries the sync.
    backend = "nccl" if torch.cuda.device_count() > 1 else "gloo"
    res = run_check([sys.executable, str(SCRIPT), "--engines", "1", "--engine", "vllm", "--tol", "1e-3",
                     "--sync-backend", backend], timeout_s=900)
    check_parity(res, 1e-3)
