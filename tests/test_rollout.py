"""Rollout engines and the pool: TorchEngine against transformers and a fresh forward;
the pool's ordering, remote attach, timeouts and dead-engine detection (every wait is bounded)."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rollout.engine import SamplingParams, TorchEngine, row_generators, row_seed, top_p_filter
from tulu.ops import logprobs_from_logits
from tulu.tiny import tiny_dir

PROMPTS = [[2, 10, 11, 12, 13], [2, 40, 41], [2, 50, 60, 70, 80, 90, 100], [2, 7]]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: extra threads only contend on a shared CPU
    yield TorchEngine(str(tiny_dir()))
    torch.set_num_threads(threads)


def left_pad(prompts, pad_id):
    B, P = len(prompts), max(map(len, prompts))
    ids, mask = torch.full((B, P), pad_id), torch.zeros((B, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    return ids, mask


def test_greedy_equals_transformers_generate(engine):
    out = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=()))
    ids, mask = left_pad(PROMPTS, engine.pad_id)
    ref = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                                do_sample=False, pad_token_id=engine.pad_id)[:, ids.shape[1] :]
    assert [g[0].token_ids for g in out] == ref.tolist()
    assert all(g[0].finish_reason == "length" and len(g[0].logprobs) == 24 for g in out)


def test_seeded_sampling_is_reproducible(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=11, stop_token_ids=())
    a, b = engine.generate(PROMPTS, sp), engine.generate(PROMPTS, sp)
    tokens = lambda out: [[c.token_ids for c in g] for g in out]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert tokens(engine.generate(PROMPTS, replace(sp, seed=12))) != tokens(a)
    assert len({tuple(c.token_ids) for c in a[0]}) == 3  # the n samples of a prompt differ
    # A prompt's samples depend on (seed + its index), not on the rest of the batch: what the pool relies on.
    alone = engine.generate([PROMPTS[2]], replace(sp, seed=sp.seed + 2))
    assert tokens(alone)[0] == tokens(a)[2]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.3, 1.0), (0.0, 1.0)])
def test_logprobs_equal_a_fresh_forward(engine, temperature, top_p):
    sp = SamplingParams(n=2 if temperature else 1, temperature=temperature, top_p=top_p, max_tokens=20, seed=3,
                        stop_token_ids=())  # greedy gives one completion per prompt
    scale = temperature or 1.0  # greedy reports log-probs at temperature 1
    worst = 0.0
    for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, sp)):
        for c in group:
            with torch.no_grad():
                logits = engine.model(input_ids=torch.tensor([prompt + c.token_ids])).logits[:, len(prompt) - 1 : -1]
            fresh = logprobs_from_logits(logits, torch.tensor([c.token_ids]), scale)[0]  # (T,)
            worst = max(worst, (fresh - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= 1e-5, worst


def test_stop_tokens(engine):
    free = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=()))[0][0]
    toks = free.token_ids
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])  # a token's first appearance, not at 0
    stopped = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12,
                                                           stop_token_ids=(free.token_ids[k],)))[0][0]
    assert stopped.token_ids == free.token_ids[: k + 1] and stopped.finish_reason == "stop"  # stop token kept
    assert free.finish_reason == "length"


def test_period_stop_token_also_stops_at_eos(engine):
    """train/rlvr.py --stop_token period: the original's vLLM stopped at EOS and the response was cut
    after its first '.' (open-instruct ppo_vllm_thread_ray_gtrl.py:830-831, 1084-1087
    @e363290). So a completion must end at whichever of '.'
    and EOS comes first: the free-running completion (same seeds) cut there, its log-probs unchanged."""
    from transformers import AutoTokenizer

    period = AutoTokenizer.from_pretrained(tiny_dir()).encode(".", add_special_tokens=False)[0]
    assert period not in engine.eos_ids
    prompts = [[2, 10 + i, 11, 12] for i in range(16)]
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=48, seed=5, stop_token_ids=())
    free = [c for g in engine.generate(prompts, sp) for c in g]
    stopped = [c for g in engine.generate(prompts, replace(sp, stop_token_ids=(period,), stop_at_eos=True)) for c in g]
    ends = {"eos": 0, "period": 0}
    for f, s in zip(free, stopped):
        cut = next((i for i, t in enumerate(f.token_ids) if t == period or t in engine.eos_ids), None)
        want = f.token_ids if cut is None else f.token_ids[: cut + 1]
        assert s.token_ids == want and s.logprobs == f.logprobs[: len(want)]
        assert s.finish_reason == ("length" if cut is None else "stop")
        if cut is not None:
            ends["period" if want[-1] == period else "eos"] += 1
    assert ends["eos"] >= 2 and ends["period"] >= 2, ends  # both ways of ending occur in this batch
    # Without stop_at_eos the stop set is exactly stop_token_ids (what `()` = never stop relies on).
    only = [c for g in engine.generate(prompts, replace(sp, stop_token_ids=(period,))) for c in g]
    assert any(set(c.token_ids[:-1]) & set(engine.eos_ids) for c in only)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    kept = top_p_filter(probs, 0.75) > 0
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert (top_p_filter(probs, 0.01) > 0).sum(-1).tolist() == [1, 1]  # always at least the top token


def test_row_generators_live_on_the_probabilities_device_and_keep_the_row_seeds():
    rows = [(0, 0), (0, 1), (3, 2)]
    gens = row_generators(7, rows, torch.device("cpu"))
    assert [g.device.type for g in gens] == ["cpu"] * 3
    probs = torch.full((50,), 0.02)
    for g, (i, j) in zip(gens, rows):  # the same draws as a generator seeded by hand with row_seed
        want = torch.multinomial(probs, 5, replacement=True, generator=torch.Generator().manual_seed(row_seed(7, i, j)))
        assert torch.equal(torch.multinomial(probs, 5, replacement=True, generator=g), want)
    if torch.cuda.is_available():  # a CPU generator on CUDA probabilities raised at the first sampled token
        g = row_generators(7, rows[:1], torch.device("cuda"))[0]
        assert torch.multinomial(probs.cuda(), 1, generator=g).device.type == "cuda"


def test_load_weights_bumps_version_and_changes_outputs(engine):
    sp = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=())
    before = engine.generate(PROMPTS, sp)
    original = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    try:
        engine.load_weights(((n, t + 0.05 * torch.randn_like(t)) for n, t in original.items()), version=5)
        after = engine.generate(PROMPTS, sp)
        assert engine.version == 5 and all(c.version == 5 for g in after for c in g)
        assert [g[0].logprobs for g in after] != [g[0].logprobs for g in before]
        with pytest.raises(KeyError, match="not updated"):  # a partial load is an error, never silent
            engine.load_weights(list(original.items())[:3])
    finally:
        engine.load_weights(original.items(), version=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pool_order_remote_attach_timeout_and_dead_engine(engine, tmp_path):
    """One local engine + one attached via `python -m rollout.serve --connect`: results in prompt
    order and equal to the in-process engine; a timeout and a SIGKILLed engine raise, naming it."""
    from rollout.errors import EngineDied, EngineTimeout
    from rollout.pool import EnginePool

    port, key = _free_port(), secrets.token_bytes(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(TULU_ROLLOUT_AUTHKEY=key.hex(), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    remote = subprocess.Popen([sys.executable, "-m", "rollout.serve", "--connect", f"127.0.0.1:{port}", "--name",
                               "remote-0", "--model", str(tiny_dir()), "--threads", "1", "--connect-timeout", "60"],
                              env=env, cwd=REPO, stdout=open(tmp_path / "remote.log", "w"), stderr=subprocess.STDOUT)
    pool = EnginePool.start(str(tiny_dir()), num_engines=1, remote_engines=1, port=port, authkey=key, threads=1,
                            start_timeout_s=90, timeout_s=60)
    try:
        assert [e.name for e in pool.engines] == ["engine-0", "remote-0"] and pool.versions == [0, 0]
        prompts = [PROMPTS[i % 4][: 2 + i % 5] + [30 + i] for i in range(7)]
        sp = SamplingParams(n=2, temperature=0.7, max_tokens=10, seed=4, stop_token_ids=())
        assert [[c.token_ids for c in g] for g in pool.generate(prompts, sp)] == \
            [[c.token_ids for c in g] for g in engine.generate(prompts, sp)]

        big = [[2, 5 + i, 9] for i in range(16)]
        long = SamplingParams(temperature=1.0, max_tokens=300, seed=0, stop_token_ids=())
        with pytest.raises(EngineTimeout, match="engine-0"):
            # 1,000 sequential decode steps cannot finish in 50 ms, however fast the machine (CI's
            # finished 16 x 100 tokens inside 0.2 s).
            pool.generate(big, replace(long, max_tokens=1000), timeout_s=0.05)

        victim = pool.engines[0].proc.pid
        # Long enough that the kill lands mid-generate even on an idle machine (64 x 1000 tokens).
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(EngineDied, match=r"engine-0 \(pid \d+\) died, exit code -9"):
            pool.generate([[2, 5 + i % 200, 9] for i in range(64)], replace(long, max_tokens=1000), timeout_s=30)
        assert time.monotonic() - t0 < 15
        with pytest.raises(EngineDied, match="engine-0"):  # later requests to it fail at once
            pool.call(pool.engines[0], "ping").result(timeout=1)
    finally:
        pool.shutdown(timeout_s=20)
        remote.wait(timeout=60)  # the attached engine exits once the pool closes its connection
    assert remote.returncode == 0, (tmp_path / "remote.log").read_text()[-3000:]


@pytest.mark.slow
def test_engine_failing_at_startup_is_reported(tmp_path):
    from rollout.errors import EngineDied
    from rollout.pool import EnginePool

    with pytest.raises(EngineDied, match=r"engine-0 .*exited with code 1 during start-up"):
        EnginePool.start(str(tmp_path / "no-such-model"), num_engines=1, threads=1, start_timeout_s=60)
