"""Weight sync, the engine side: join the group the trainer's rank 0 hosts, receive each sync's metadata
and buckets, and hand the tensors to the engine's loader. The trainer side, and the protocol itself,
are in rollout/weight_sync.py; this file reads as its counterpart, message for message.
"""
from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from rollout.groups import LOOPBACK, close_group, new_group, recv_obj


class WeightReceiver:
    """Engine side of the group (one per engine worker): receive() yields (name, tensor) per parameter."""

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str, device, timeout_s: float,
                 local_host: str | None = None, reuse_buffers: bool = True):
        self.device = torch.device(device) if backend == "nccl" else torch.device("cpu")  # gloo moves host memory
        # reuse_buffers: receive into two buffers kept across syncs (fast on host memory, see
        # weight_sync.WeightSync._bucket_buffer). Yielded tensors are then views that stay valid only until two
        # buckets later: the consumer must copy each one as it comes (TorchEngine does).
        self.reuse_buffers, self._ring = reuse_buffers, []
        store = dist.TCPStore(host, port, world_size=world, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        bind = local_host if local_host is not None else (host if host in LOOPBACK else "")
        self.pg = new_group(store, rank, world, backend, timeout_s, bind)
        self._store, self.last_recv_s = store, 0.0
        self.last_bytes, self.last_dtypes = 0, []  # of the last sync: what actually arrived

    def receive(self):
        """Wait for the next sync's metadata; returns (version, iterator of (name, tensor)). The
        iterator receives bucket by bucket and must be consumed to the end (the trainer is waiting)."""
        t = time.perf_counter()
        header = recv_obj(self.pg, self.device)
        self.last_recv_s = time.perf_counter() - t
        return header["version"], self._tensors(header)

    def _tensors(self, header):
        self.last_bytes, dtypes = 0, set()
        if header["mode"] == "per_param":
            for _ in range(header["count"]):
                t = time.perf_counter()
                name, dtype, shape = recv_obj(self.pg, self.device)
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.pg.broadcast(tensor, 0).wait()
                self.last_recv_s += time.perf_counter() - t
                self.last_bytes += tensor.nbytes
                dtypes.add(dtype)
                yield name, tensor
            self.last_dtypes = sorted(dtypes)
            return
        by_bucket: list[list] = [[] for _ in header["buckets"]]
        for name, dtype, shape, bucket, offset in header["params"]:
            by_bucket[bucket].append((name, getattr(torch, dtype), shape, offset))
            dtypes.add(dtype)
        self.last_dtypes = sorted(dtypes)
        if self.reuse_buffers and (not self._ring or self._ring[0].numel() < max(header["buckets"])):
            self._ring = [torch.empty(max(header["buckets"]), dtype=torch.uint8, device=self.device) for _ in range(2)]
        for bucket, size in enumerate(header["buckets"]):
            t = time.perf_counter()
            if self.reuse_buffers:
                buf = self._ring[bucket % 2][:size]
            else:
                buf = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.pg.broadcast(buf, 0).wait()
            self.last_recv_s += time.perf_counter() - t
            for name, dt, shape, offset in by_bucket[bucket]:
                self.last_bytes += math.prod(shape) * dt.itemsize  # the tensors, not the alignment gaps
                yield name, buf[offset : offset + math.prod(shape) * dt.itemsize].view(dt).view(shape)

    def close(self) -> None:
        close_group(self.pg)
        self.pg = None


def receive_and_load(receiver: WeightReceiver, load: Callable[[Iterable[tuple[str, torch.Tensor]], int], object],
                     synchronize: bool = False) -> dict:
    """One sync on an engine worker: receive, `load(weights, version)`, and reply with the version and
    timings the trainer logs. A failed load still drains every bucket, so the trainer never hangs in
    a broadcast; the error then travels back as the request's failure."""
    t0 = time.perf_counter()
    version, weights = receiver.receive()
    try:
        load(weights, version)
    finally:
        for _ in weights:
            pass
    if synchronize and torch.cuda.is_available():  # the copies into GPU weights are asynchronous
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {"version": version, "recv_s": receiver.last_recv_s, "load_s": total - receiver.last_recv_s,
            "recv_bytes": receiver.last_bytes, "recv_dtypes": receiver.last_dtypes}
