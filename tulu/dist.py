"""Distributed setup: the only reader of RANK / WORLD_SIZE / LOCAL_RANK.

`init_dist()` always starts a process group, also at world size 1 (plain `python train/sft.py`),
so every script takes one code path: nccl (plus gloo for host tensors) on GPU, gloo on CPU.
"""
from __future__ import annotations

import datetime
import functools
import gc
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    local_world: int = 1  # ranks on this node (GPU placement of local rollout engines counts them)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher() -> None:
    """Under torchrun, end this rank the moment its launcher dies, even by SIGKILL.

    torchrun starts each worker in a session of its own, so a SIGKILL to the launcher (an OOM
    killer, a scheduler, `kill -9`) used to leave the ranks training and writing into output_dir
    beside the run that resumed there. On Linux the kernel sends us SIGKILL when the parent (the
    launcher's agent) exits (prctl PR_SET_PDEATHSIG); elsewhere a thread polls the parent pid. A
    save cut short this way leaves only a step_N.tmp folder, which resume never reads."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    parent = os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()
    if os.getppid() != parent or (parent == 1 and not _launcher_is_init()):  # it died before we were armed
        print(f"[rank {os.environ.get('RANK', '?')}] the launcher is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def _launcher_is_init() -> bool:
    """Whether PID 1 is torchrun itself (a container started with `torchrun ...` as its command)."""
    try:
        return b"torch" in open("/proc/1/cmdline", "rb").read()
    except OSError:
        return True  # cannot tell: do not exit


def init_dist(timeout_s: int = 1800) -> Dist:
    """Join (or, without torchrun, create) the default process group and pick this rank's device.
    Under torchrun the rank first ties its life to the launcher's (die_with_launcher)."""
    die_with_launcher()
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        # nccl for device tensors, gloo for host ones: with --cpu_offload the gradients (and so
        # clip_grad_norm_'s reduction) live on the host, and nccl alone cannot reduce host memory.
        device, backend = torch.device("cuda", local_rank), "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        # torchrun sets OMP_NUM_THREADS=1 for >1 process; share the cores out instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device, backend, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def is_node_leader() -> bool:
    """Local rank 0: the process that prepares a node's own files (e.g. its tokenized-data cache)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def print0(*args) -> None:
    """print on rank 0 only, above any progress bar (tqdm.write), flushed: torchrun buffers child output."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum/max/min/avg) over the default group; a no-op at world size 1."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op == "avg":
            dist.all_reduce(t, dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, ops[op])
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object built by our own code (never user files) from `src`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# Messages of a collective that failed because a peer process died (gloo's tcp transport, NCCL abort).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
              "NCCL communicator was aborted", "ProcessGroupNCCL is aborted")


def entrypoint(main):
    """Decorate a script's main so that a crash on one rank is reported once and ends every rank.

    The rank that raises first writes its traceback to torchrun's error file (what `@record` does),
    and torchrun prints it once, under "Root Cause", then stops the other ranks. A rank whose
    collective fails because that peer is gone prints one line instead of a second traceback and
    lets torchrun stop it (see `_die`). Without torchrun (plain `python train/x.py`) the exception
    propagates as usual."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        handler = get_error_handler()
        handler.initialize()
        try:
            return main(*args, **kwargs)
        except Exception as e:
            rank = os.environ.get("RANK", "0")
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            if any(marker in str(e) for marker in _PEER_GONE):
                _die(f"[rank {rank}] stopping: a collective failed because another rank exited first; that rank's "
                     f"error is the cause ({type(e).__name__}: {first_line})", wait_for_torchrun=True)
            if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
                raise
            handler.record_exception(e)
            _die(f"[rank {rank}] failed with {type(e).__name__}; torchrun prints the traceback once, under "
                 f"'Root Cause'")

    return run


def _die(line: str, wait_for_torchrun: bool = False) -> None:
    """Exit 1, skipping interpreter teardown (which can abort with FSDP state alive). With
    `wait_for_torchrun`, first give torchrun (which polls every 0.1 s) up to 10 s to see the rank
    that failed first and stop us with SIGTERM, so that its summary names that rank as the root
    cause rather than this one."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    if wait_for_torchrun and os.environ.get("TORCHELASTIC_RUN_ID"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # our StopRequest handler would only set a flag
        time.sleep(10)
    os._exit(1)


def shutdown() -> None:
    """Tear down cleanly and exit 0. Measured here: ranks that exit with FSDP/DTensor state alive
    crash at interpreter exit (SIGABRT) about 1 run in 6, so the caller drops its model/optimizer
    references first (`del model, optimizer`), we collect, destroy the group, and leave without
    running the interpreter's teardown."""
    gc.collect()
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
