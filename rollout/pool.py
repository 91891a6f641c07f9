"""EnginePool: N rollout engine processes, requests spread across them, results in prompt order.

    pool = EnginePool.start("tulu/tiny", num_engines=2)            # local engine processes
    out = pool.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=256, seed=step))
    # out[i][j]: completion j of prompt i (a Completion: token_ids, logprobs, finish_reason, version)
    pool.shutdown()

Engines are separate processes (`python -m rollout.serve`), never part of the torchrun world. Each
one connects back to the pool's listener (`multiprocessing.connection`, HMAC-authenticated with a
random key, so pickled control messages only ever come from our own processes) and serves
requests one at a time. Weight data does not travel here: see rollout/weight_sync.py.

- Local engines: `start(num_engines=N)` launches them, each in a session of its own, with its own
  GPU(s) (CUDA_VISIBLE_DEVICES: the ones after the trainer's local ranks, `engine_gpus`) or its own
  share of CPU threads (vLLM: bound to cores of its own, `engine_cores`), logging to
  `<log_dir>/<name>.log`.
- Remote engines: `start(..., remote_engines=K, host="0.0.0.0", port=P)` also waits for K engines
  started elsewhere with `TULU_ROLLOUT_AUTHKEY=<pool.authkey_hex> python -m rollout.serve --connect
  HOST:P --model ...`; the pool prints the exact command.
- A dead engine (its connection closes, or a local process exits) fails every request it holds with
  `EngineDied`, naming it, its exit code and its last log lines; a request that outlives its timeout
  raises `EngineTimeout`. Nothing waits forever.
- Thread-safe: `generate` may run in a background thread while the main thread trains and pushes
  weights; requests to one engine are served in the order they were sent.
- `shutdown()` is idempotent and also runs at interpreter exit; it ends with SIGKILL to each local
  engine's process group, so nothing an engine started (vLLM's engine core and workers) outlives
  it; an engine found dead gets the same. If the trainer is killed (any signal), engines exit by
  themselves, and kill what they started: their connection closes, and local engines also watch
  their parent pid.
"""
from __future__ import annotations

import atexit
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import replace
from multiprocessing.connection import Listener
from pathlib import Path

from rollout.engine import Completion, SamplingParams
from rollout.errors import EngineDied, EngineTimeout
from rollout.handle import EngineHandle, kill_group

REPO_ROOT = Path(__file__).resolve().parent.parent
_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


class EnginePool:
    def __init__(self, engines: list[EngineHandle], listener: Listener, authkey: bytes, timeout_s: float):
        self.engines, self._listener, self.authkey, self.timeout_s = engines, listener, authkey, timeout_s
        self._closed = False
        _LIVE_POOLS.add(self)
        _install_exit_handlers()

    @property
    def authkey_hex(self) -> str:
        return self.authkey.hex()

    @property
    def versions(self) -> list[int]:
        return [e.version for e in self.engines]

    @classmethod
    def start(cls, model_path: str, num_engines: int = 1, *, engine: str = "torch", remote_engines: int = 0,
              host: str = "127.0.0.1", port: int = 0, threads: int | None = None, gpus_per_engine: int = 1,
              trainer_gpus: int = 0, engine_args: list[str] | None = None, log_dir: str | None = None,
              authkey: bytes | None = None, start_timeout_s: float = 600.0, timeout_s: float = 3600.0) -> "EnginePool":
        """Launch `num_engines` local engine processes (and wait for `remote_engines` more to
        connect); returns when all are loaded and connected. engine: "torch" or "vllm".
        trainer_gpus: GPUs this node's trainer ranks hold (its local world size on a GPU node); vLLM
        engines get the next ones (`engine_gpus`). On a CPU node, each vLLM engine's OpenMP threads
        are bound to cores of its own (`engine_cores`).
        engine_args: extra `rollout.serve` flags, e.g. ["--dtype", "bf16", "--max-batch-rows", "32"].
        authkey: the connection key (default: $TULU_ROLLOUT_AUTHKEY as hex if set, else random).
        timeout_s: default per-request timeout (generate, sync steps)."""
        if authkey is None:
            env_key = os.environ.get("TULU_ROLLOUT_AUTHKEY")
            authkey = bytes.fromhex(env_key) if env_key else secrets.token_bytes(32)
        threads = threads or max(1, (os.cpu_count() or 1) // max(1, num_engines))
        placement = [{} for _ in range(num_engines)]
        if engine == "vllm" and num_engines:
            import torch

            if torch.cuda.is_available():  # raises before anything starts when the GPUs do not suffice
                gpus = engine_gpus(num_engines, gpus_per_engine, trainer_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   torch.cuda.device_count())
                placement = [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
            else:
                usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
                cores = engine_cores(num_engines, threads, gpus_per_engine, sorted(usable))
                placement = [{"VLLM_CPU_OMP_THREADS_BIND": c} for c in cores]
        listener = Listener((host, port), authkey=authkey)
        logs = Path(log_dir or tempfile.mkdtemp(prefix="tulu-rollout-"))
        logs.mkdir(parents=True, exist_ok=True)
        procs = {}
        for i in range(num_engines):
            name = f"engine-{i}"
            env = _child_env(authkey, threads) | placement[i]
            cmd = [sys.executable, "-m", "rollout.serve", "--connect", f"{host}:{listener.address[1]}", "--name", name,
                   "--engine", engine, "--model", str(model_path), "--threads", str(threads),
                   "--tp", str(gpus_per_engine), "--parent-pid", str(os.getpid()), *(engine_args or [])]
            log = open(logs / f"{name}.log", "w")
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                            start_new_session=True), logs / f"{name}.log")
        if remote_engines:
            print(f"[rollout] waiting for {remote_engines} remote engine(s): TULU_ROLLOUT_AUTHKEY={authkey.hex()} "
                  f"python -m rollout.serve --connect {host}:{listener.address[1]} --engine {engine} "
                  f"--model {model_path} --name <name>", flush=True)
        try:
            engines = _accept(listener, procs, num_engines + remote_engines, start_timeout_s)
        except BaseException:
            for proc, _ in procs.values():
                kill_group(proc)
            listener.close()
            raise
        return cls(engines, listener, authkey, timeout_s)

    # -- requests ----------------------------------------------------------------------------------

    def call(self, engine: EngineHandle, op: str, *args) -> Future:
        return engine.request(op, *args)

    def call_all(self, op: str, *args) -> list[Future]:
        return [e.request(op, *args) for e in self.engines]

    def wait(self, futures: list[Future], timeout_s: float | None = None, what: str = "request",
             owners: list[EngineHandle] | None = None) -> list:
        """Results of `futures` (sent to `owners`, default: one per engine in order). The first
        failure raises at once (EngineDied / EngineError); a timeout raises EngineTimeout naming
        the engines that did not answer."""
        owners = self.engines if owners is None else owners
        timeout_s = timeout_s or self.timeout_s
        done, pending = wait(futures, timeout=timeout_s, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut in done and fut.exception() is not None:
                raise fut.exception()
        if pending:
            late = [e.status() for e, f in zip(owners, futures) if f in pending]
            raise EngineTimeout(f"{what}: no answer after {timeout_s:.1f}s from {late}")
        return [f.result() for f in futures]

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 timeout_s: float | None = None) -> list[list[Completion]]:
        """n completions per prompt, in prompt order. Prompts are split into contiguous chunks, one
        per live engine; a chunk's seed is shifted by its first prompt index (see rollout/engine.py)."""
        live = [e for e in self.engines if not e.dead]
        if not live:
            raise EngineDied("no live rollout engines: " + "; ".join(e.status() for e in self.engines))
        bounds = [round(k * len(prompts) / len(live)) for k in range(len(live) + 1)]
        futures, owners = [], []
        for e, lo, hi in zip(live, bounds, bounds[1:]):
            if hi > lo:
                chunk_params = params if params.seed is None else replace(params, seed=params.seed + lo)
                futures.append(e.request("generate", [list(p) for p in prompts[lo:hi]], chunk_params))
                owners.append(e)
        results = self.wait(futures, timeout_s, "generate", owners)
        return [group for chunk in results for group in chunk]

    # -- teardown ----------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Ask every engine to exit, wait, then kill stragglers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for e in self.engines:
            e._closing = True
            if not e.dead:
                e.request("shutdown")
        deadline = time.monotonic() + timeout_s
        for e in self.engines:
            if e.proc is not None:
                try:
                    e.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                kill_group(e.proc)  # stragglers, and anything an engine left behind (its own session)
                e.proc.wait()
            e.conn.close()
        self._listener.close()
        _LIVE_POOLS.discard(self)


def engine_gpus(num_engines: int, gpus_per_engine: int, trainer_gpus: int, visible: str | None,
                device_count: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each local vLLM engine: the GPUs after the ones the trainer's local
    ranks hold (local rank r uses visible GPU r), in the parent's numbering (`visible`, else 0..N-1).
    Engines never share a GPU with each other or with a trainer rank: too few GPUs is an error."""
    physical = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(device_count)]
    need = trainer_gpus + num_engines * gpus_per_engine
    if need > len(physical):
        raise ValueError(f"{num_engines} vLLM engine(s) x {gpus_per_engine} GPU(s) after the trainer's {trainer_gpus} "
                         f"need {need} GPUs; this node has {len(physical)} ({physical}). Use fewer engines or trainer "
                         "ranks, or run the engines on other nodes (python -m rollout.serve --connect ...)")
    free = physical[trainer_gpus:]
    return [",".join(free[i * gpus_per_engine : (i + 1) * gpus_per_engine]) for i in range(num_engines)]


def engine_cores(num_engines: int, threads: int, workers: int, cores: list[int]) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND of each local CPU vLLM engine: `threads` cores of its own, counted
    from the last core (the trainer's threads are not bound), split among its `workers` (TP ranks,
    '|'-separated). vLLM's "auto" would bind every engine to the same first cores. When the cores
    do not go round: "nobind" (each engine runs `threads` unbound threads, OMP_NUM_THREADS)."""
    per_worker = threads // workers
    if per_worker < 1 or num_engines * per_worker * workers > len(cores):
        return ["nobind"] * num_engines
    out = []
    for i in range(num_engines):
        mine = cores[len(cores) - (i + 1) * per_worker * workers : len(cores) - i * per_worker * workers]
        out.append("|".join(",".join(map(str, mine[w * per_worker : (w + 1) * per_worker])) for w in range(workers)))
    return out


def _child_env(authkey: bytes, threads: int) -> dict:
    """The engine's environment: no torchrun variables (it must not join the trainer's world)."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")}
    env["TULU_ROLLOUT_AUTHKEY"] = authkey.hex()
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _accept(listener: Listener, procs: dict, count: int, timeout_s: float) -> list[EngineHandle]:
    """Accept `count` engine connections (hello first). A local engine that exits during start-up,
    or a start that takes longer than timeout_s, raises EngineDied / EngineTimeout."""
    got: list = []
    errors: list = []

    def accept_loop():
        while len(got) < count:
            try:
                conn = listener.accept()
                got.append((conn, conn.recv()))
            except Exception as e:  # a closed listener ends the loop; a bad client is skipped
                if listener._listener is None:
                    return
                errors.append(e)

    threading.Thread(target=accept_loop, name="rollout-accept", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None and name not in {h["name"] for _, h in got}:
                tail = "\n  ".join(log.read_text(errors="replace").splitlines()[-15:])
                raise EngineDied(f"rollout engine {name} (pid {proc.pid}) exited with code {proc.returncode} "
                                 f"during start-up; last log lines ({log}):\n  {tail}")
        if time.monotonic() > deadline:
            raise EngineTimeout(f"only {len(got)} of {count} rollout engines connected within {timeout_s:.0f}s "
                                f"(errors: {errors})")
        time.sleep(0.05)
    order = {name: i for i, name in enumerate(procs)}
    got.sort(key=lambda ch: order.get(ch[1]["name"], len(order)))
    return [EngineHandle(conn, hello, *procs.get(hello["name"], (None, None))) for conn, hello in got]


def _shutdown_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.shutdown()


_ATEXIT_INSTALLED = False


def _install_exit_handlers() -> None:
    """Shut engines down at interpreter exit. No SIGTERM handler on purpose: a Python handler
    cannot run while the main thread is blocked in a C++ collective, so it would make the trainer
    ignore SIGTERM. Signals are covered from the engine side instead: every engine exits when its
    pool connection closes, and local engines also when their parent process disappears."""
    global _ATEXIT_INSTALLED
    if not _ATEXIT_INSTALLED:
        _ATEXIT_INSTALLED = True
        atexit.register(_shutdown_all)
