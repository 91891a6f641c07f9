"""One rollout engine process: load a model, connect to an EnginePool, serve its requests.

The pool starts local engines itself. To attach an engine on another machine, start the pool with
`remote_engines=K, host=<an address the engine can reach>, port=P` and run there:

    TULU_ROLLOUT_AUTHKEY=<pool.authkey_hex> python -m rollout.serve --connect HOST:P \
        --engine vllm --model PATH --tp 8 --name node1 [--sync-host <this node's address>]

Requests are (id, op, args) tuples over an HMAC-authenticated `multiprocessing.connection`; replies
are (id, ok, result-or-traceback). Ops: generate, init_sync, receive_weights, close_sync, ping,
shutdown. They are served one at a time, in order. When the pool's connection closes (the trainer
exited or was killed), the engine exits too: it stops the engine (vLLM: its engine core and
workers, the supported way), then SIGKILLs any process it started that is still there.
The first message, the hello, carries the engine's torch / NCCL / vLLM versions and its device:
the trainer checks them before it builds the weight-sync group.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client

from rollout.groups import runtime_versions


def serve_args(engine: str, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
               gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None,
               enforce_eager: bool = False) -> list[str]:
    """The flags below for a local engine (the pool's engine_args). dtype auto|float32|bfloat16. vLLM
    on CPU is always eager: torch.compile of its model costs minutes on a few cores, buys little."""
    args = [] if dtype == "auto" else ["--dtype", {"float32": "fp32", "bfloat16": "bf16"}[dtype]
                                       if engine == "torch" else dtype]
    if engine != "vllm":
        return args
    args += ["--seed", str(seed), "--gpu-memory-utilization", str(gpu_memory_utilization)]
    args += ["--max-model-len", str(max_model_len)] if max_model_len else []
    args += ["--kv-cache-gib", str(kv_cache_gib)] if kv_cache_gib else []
    import torch

    return args + (["--enforce-eager"] if enforce_eager or not torch.cuda.is_available() else [])


def build_engine(args):
    if args.engine == "torch":
        from rollout.engine import TorchEngine

        return TorchEngine(args.model, device=args.device, dtype=args.dtype, threads=args.threads,
                           max_batch_rows=args.max_batch_rows)
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(args.model, tensor_parallel_size=args.tp, dtype=args.dtype, seed=args.seed,
                      gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                      max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                      enforce_eager=args.enforce_eager)


def serve(conn, engine, sync_host: str | None) -> None:
    """The request loop; returns on shutdown or when the pool goes away."""
    handlers = {
        "generate": engine.generate,
        "init_sync": lambda *a: engine.init_sync(*a, local_host=sync_host),
        "receive_weights": engine.receive_weights,
        "close_sync": engine.close_sync,
        "ping": lambda: {"version": engine.version, "pid": os.getpid()},
    }
    while True:
        try:
            rid, op, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if op == "shutdown":
            result, ok = None, True
        else:
            try:
                result, ok = handlers[op](*args), True
            except Exception:
                result, ok = traceback.format_exc(), False
        try:
            conn.send((rid, ok, result))
        except OSError:  # the pool went away (it closes its end right after asking for a shutdown)
            return
        if op == "shutdown":
            return


def connect(host: str, port: int, key: bytes, timeout_s: float):
    """Connect to the pool, retrying while it is not listening yet (a remote engine may start first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client((host, port), authkey=key)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def kill_descendants() -> None:
    """SIGKILL every process this one started (vLLM's engine core and workers), whatever they are doing."""
    try:
        import psutil  # a vLLM dependency; TorchEngine starts no processes
    except ImportError:
        return
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def watch_parent(pid: int) -> None:
    """Exit as soon as the process that started us is gone, even while busy generating or
    blocked in a collective (so a killed trainer never leaves engines holding GPUs)."""
    while os.getppid() == pid:
        time.sleep(1.0)
    kill_descendants()
    os._exit(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", required=True, help="HOST:PORT of the EnginePool")
    p.add_argument("--name", default=None, help="engine name in errors and logs (default: host-pid)")
    p.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    p.add_argument("--model", required=True, help="local HF folder or name (tulu/tiny, hub id)")
    p.add_argument("--dtype", default=None,
                   help="torch: fp32|bf16|fp16 (default fp32); vllm: bfloat16|float32|auto (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cpu", help="torch engine device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-batch-rows", type=int, default=64, help="torch engine rows decoded at once")
    p.add_argument("--tp", type=int, default=1, help="vllm tensor parallel size")
    p.add_argument("--seed", type=int, default=0, help="vllm engine seed")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: GPU memory fraction")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="vllm: KV cache size (default: from the GPU "
                   "memory fraction on GPU, 1 GiB on CPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--connect-timeout", type=float, default=600.0, help="seconds to keep retrying the pool")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (local engines)")
    p.add_argument("--sync-host", default=None, help="address this engine binds in the weight-sync group")
    args = p.parse_args(argv)
    if args.dtype is None and args.engine == "torch":
        args.dtype = "fp32"
    if args.engine != "torch":
        args.tp = max(1, args.tp)
    else:
        args.tp = 1
    if args.parent_pid:
        threading.Thread(target=watch_parent, args=(args.parent_pid,), daemon=True).start()
    host, port = args.connect.rsplit(":", 1)
    key = bytes.fromhex(os.environ["TULU_ROLLOUT_AUTHKEY"])
    engine, code = None, 1
    try:
        engine = build_engine(args)
        conn = connect(host, int(port), key, args.connect_timeout)
        name = args.name or f"{os.uname().nodename}-{os.getpid()}"
        conn.send({"name": name, "pid": os.getpid(), "sync_ranks": args.tp, "version": engine.version,
                   "runtime": runtime_versions(), "device": str(engine.device)})
        try:
            serve(conn, engine, args.sync_host)
            code = 0
        finally:
            conn.close()
    except BaseException:  # printed here: os._exit below skips the interpreter's own report
        traceback.print_exc()
    finally:
        try:
            if engine is not None:
                engine.shutdown()  # vLLM: stop its engine core and workers the supported way first
        except Exception:
            traceback.print_exc()
            code = 1
        kill_descendants()  # then make sure: nothing this engine started outlives it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: side groups alive at exit can abort the process


if __name__ == "__main__":
    main()
