"""Failure paths of a trainer with vLLM engines (tests/test_vllm.py runs both modes at once):

--mode raise: one engine; the run then fails with an exception and exits through the pool's exit
    handler, which must stop the engine and everything vLLM started for it.
--mode hang: two engines; engine-0 is SIGKILLed in the middle of a generation, which must raise the
    pool's EngineDied naming it within the request's timeout, and take engine-0's vLLM processes
    with it; then the trainer waits to be SIGKILLed itself (kill -9, the OOM killer), after which
    engine-1 and its vLLM processes must exit by themselves.

Prints one JSON line, then POOL_READY. Every process an engine starts carries the pool's
TULU_ROLLOUT_AUTHKEY in its environment: that is how the test finds what is left.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time

from rollout.engine import SamplingParams
from rollout.errors import EngineDied
from rollout.pool import EnginePool
from tulu.tiny import tiny_dir


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["raise", "hang"], required=True)
    args = p.parse_args()
    engines = 1 if args.mode == "raise" else 2
    pool = EnginePool.start(str(tiny_dir()), engines, engine="vllm", threads=1, start_timeout_s=300, timeout_s=120,
                            engine_args=["--kv-cache-gib", "0.25", "--enforce-eager"])
    pool.generate([[2, 10, 11]] * engines, SamplingParams(max_tokens=4, seed=0))
    res = {"mode": args.mode, "engine_pids": [e.pid for e in pool.engines]}
    if args.mode == "hang":
        victim = pool.engines[0]
        long = SamplingParams(temperature=1.0, max_tokens=1000, seed=0, stop_token_ids=())
        threading.Timer(1.0, os.kill, (victim.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        try:
            victim.request("generate", [[2, 5 + i % 200, 9] for i in range(64)], long).result(timeout=60)
        except EngineDied as e:
            res["died_error"] = str(e).splitlines()[0]
        res["died_after_s"] = time.monotonic() - t0
        deadline = time.monotonic() + 15
        while group_alive(victim.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        res["victim_group_alive"] = group_alive(victim.proc.pid)
        res["survivor_serves"] = len(pool.engines[1].request("generate", [[2, 7]], SamplingParams(max_tokens=2))
                                     .result(timeout=60)) == 1
    print(json.dumps(res))
    print("POOL_READY", flush=True)
    if args.mode == "raise":
        raise RuntimeError("the run failed after its engines started")
    time.sleep(600)


if __name__ == "__main__":
    main()
