"""Weight sync, the trainer side: stream the trainer's FSDP parameters into every rollout engine, bucket
by bucket. The engine side, which receives and loads, is rollout/receiver.py.

The group. Trainer rank 0 and every engine worker (a TorchEngine process; each tensor-parallel worker
of a vLLM engine) form a process group of their own: a TCPStore that rank 0 hosts on the address you
give (loopback by default; the listening socket is bound to exactly that address) and a
ProcessGroupGloo (CPU) or ProcessGroupNCCL (GPU) built on it directly. It never joins the trainer's
torchrun world and is not FSDP's group, so a sync and a training step cannot deadlock on each other.

One sync (`WeightSync.push`, called by EVERY trainer rank: `full_tensor()` is a collective):
1. rank 0 asks every engine (over the pool's control connection) to receive, then broadcasts ONE
   metadata message for the whole sync: version, bucket sizes, and (name, dtype, shape, bucket,
   offset) per parameter (JSON, two small broadcasts: length, then bytes);
2. every rank walks `named_parameters()` in order and all-gathers one parameter at a time
   (`full_tensor()`), so no rank ever holds more than one full parameter plus the buckets in flight,
   never two copies of the model; rank 0 packs the bytes into fixed-size buckets and broadcasts each
   full bucket asynchronously (at most two in flight) while it gathers the next parameters. A
   parameter larger than a bucket is broadcast as it is (no copy). Bucket buffers are two per side,
   kept across syncs (fresh host buffers measured 5-8x slower to broadcast: page faults);
3. engines receive bucket by bucket, load the views into their model, set `version`, and reply with
   their timings; rank 0 checks every engine reports the new version.

Timing split per sync (returned and logged): gather (the all-gathers), broadcast (packing plus
waiting for broadcasts; includes time the engines spend loading earlier buckets), load (engine side,
max over engines), total. `per_param=True` reproduces the original's scheme for comparison: one
metadata message and one broadcast per parameter. Tensors travel in the dtype the engines hold (they
report it when they join): bf16 to a bf16 vLLM engine (half the bytes of the fp32 masters; the
original's full bf16 tensors), fp32 to the default CPU TorchEngine; `dtype=` overrides.

Waiting: a push first waits, on every rank, until the engines have answered every request sent
before it (async mode: the next batch's generation), polling in tiny all-reduces (`wait_together`)
rather than inside the group's collectives: a generation may take longer than any collective timeout
(the original waited without limit); the pool's timeout_s (an engine busy that long) ends the wait.

Failures: push raises EngineDied before any collective when the pool already knows an engine is
dead; an engine dying mid-sync closes its connections and gloo raises at once (measured: ~10 ms);
anything else is bounded by the group's timeout_s. Nothing waits forever. Under NCCL (GPU engines)
a peer dying mid-broadcast is not seen by the transport: the broadcast blocks until NCCL's watchdog
aborts it after timeout_s (600 s by default), and the error names the sync group, not the engine
(the pool's log of that engine says why it died). Not measured: no GPU has run it yet.

Usage on the trainer (rank 0 owns the pool; the other ranks pass None):

    pool = EnginePool.start(model_path, num_engines=2) if rank == 0 else None
    sync = WeightSync(pool)                    # every rank; rank 0 builds the group with the engines
    ...train a step...
    stats = sync.push(model, version=step)     # every rank, between steps
    sync.close()                               # every rank, before pool.shutdown()
A push issued while a generate is running waits for it (see Waiting), so every Completion is
produced by exactly one version, reported in `Completion.version`.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollout.errors import EngineDied
from rollout.groups import (check_versions, close_group, listen_store, new_group, runtime_versions, send_obj,
                            sync_backend, wait_together)

ALIGN = 64  # byte alignment of every tensor in a bucket: any dtype can view it, NCCL likes it


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    bucket: int
    offset: int  # bytes into the bucket

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_buckets(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> tuple[list[Slot], list[int]]:
    """Pack parameters, in order, into buckets of at most bucket_bytes (a larger parameter gets a
    bucket of its own). Returns one Slot per parameter and each bucket's size in bytes."""
    slots, sizes, used = [], [], 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if not sizes or (used > 0 and used + nbytes > bucket_bytes):
            sizes.append(0)
            used = 0
        slots.append(Slot(name, dtype, tuple(shape), len(sizes) - 1, used))
        sizes[-1] = used + nbytes  # no padding after the last tensor: a lone tensor's bucket is the tensor
        used = -(-(used + nbytes) // ALIGN) * ALIGN
    return slots, sizes


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class WeightSync:
    """Trainer side. Build on every trainer rank; only rank 0 talks to the engines."""

    def __init__(self, pool=None, *, host: str = "127.0.0.1", port: int = 0, backend: str | None = None,
                 bucket_mb: float | None = None, dtype: torch.dtype | None = None, timeout_s: float = 600.0,
                 log: bool = True):
        """dtype: what travels; None = the dtype the engines hold (they report it when they join):
        bf16 for vLLM (the original broadcast full bf16 tensors from rank 0: open-instruct
        ppo_vllm_thread_ray_gtrl.py:786-824 @e363290), fp32 for the default CPU
        TorchEngine, so an fp32 engine gets the fp32 master weights bit for bit."""
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dtype, self.timeout_s, self.log = dtype, timeout_s, log
        self.pool, self.pg, self.history = pool, None, []
        self._ring: list[torch.Tensor] = []  # rank 0's two reusable bucket buffers (see _bucket_buffer)
        self.backend, self.device, self.bucket_bytes = None, torch.device("cpu"), 0  # rank 0 sets them
        engine_dtype = self._connect(host, port, backend, bucket_mb) if self.rank == 0 else None
        if dtype is None:
            if dist.is_initialized() and dist.get_world_size() > 1:  # every rank casts its shard before the gather
                box = [engine_dtype]
                dist.broadcast_object_list(box, src=0)
                engine_dtype = box[0]
            self.dtype = getattr(torch, engine_dtype) if engine_dtype else None  # None: the params' own

    def _connect(self, host: str, port: int, backend: str | None, bucket_mb: float | None) -> str | None:
        """Rank 0: check the engines can join (versions, devices), build the group with every engine
        worker; returns the dtype the engines hold."""
        pool, timeout_s = self.pool, self.timeout_s
        if pool is None:
            raise ValueError("WeightSync on trainer rank 0 needs the EnginePool")
        check_versions(runtime_versions(), [(e.name, e.runtime) for e in pool.engines])  # before any collective
        self.backend = sync_backend(backend, torch.cuda.is_available(), {e.name: e.device for e in pool.engines})
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        # Default bucket: 1 MiB on gloo (fastest measured here, benchmarks/weight_sync.py: the engine loads
        # bucket k while k+1 travels); 256 MiB on NCCL (not measured yet: no GPU was lent).
        self.bucket_bytes = int((bucket_mb if bucket_mb is not None else (1.0 if self.backend == "gloo" else 256.0)) * 2**20)
        offsets, world = [], 1
        for engine in pool.engines:  # sync rank of engine i's first worker
            offsets.append(world)
            world += engine.sync_ranks
        self.store = listen_store(host, port, world, timeout_s)
        self.port = self.store.port
        futures = [pool.call(e, "init_sync", host, self.port, off, world, self.backend, timeout_s)
                   for e, off in zip(pool.engines, offsets)]
        self.pg = new_group(self.store, 0, world, self.backend, timeout_s, host)  # returns once all joined
        replies = pool.wait(futures, timeout_s, "init_sync")
        held = {(r or {}).get("dtype") for r in replies}  # None: an engine that does not say
        if len(held) > 1:
            raise ValueError(f"weight sync: engines hold different dtypes {sorted(map(str, held))}; "
                             "start them with one --dtype")
        return held.pop() if held else None

    def push(self, model: torch.nn.Module, version: int, per_param: bool = False) -> dict:
        """Send every parameter of `model` (FSDP-sharded or plain) to every engine; collective."""
        from tulu.fsdp import reshard
        from tulu.layouts import Layout

        reshard(model)  # a no-grad forward leaves FSDP units with plain unsharded params
        # Tensors travel in the checkpoint layout (tulu/layouts.py): the names and shapes vLLM's
        # load_weights expects; a fused in-memory parameter (an MoE layer's experts) becomes its parts.
        layout = Layout(model)
        named, specs, owner = list(model.named_parameters()), [], []
        for j, (n, p) in enumerate(named):
            for name, shape in layout.checkpoint_shapes(n, tuple(p.shape)):
                specs.append((name, self.dtype or p.dtype, shape))
                owner.append(j)
        slots, sizes = plan_buckets(specs, 1 if per_param else self.bucket_bytes)
        t0 = time.perf_counter()
        if per_param:  # names, dtypes and shapes then travel with each parameter
            header = {"version": version, "mode": "per_param", "count": len(slots)}
        else:
            header = {"version": version, "mode": "bucket", "buckets": sizes,
                      "params": [[s.name, _dtype_name(s.dtype), list(s.shape), s.bucket, s.offset] for s in slots]}
        # Async mode: the engines are generating the next batch, and must finish before they can
        # receive. Wait for that here, outside the sync group's collectives (whose timeout_s would
        # otherwise cap how long a generation may outlast training); the pool's timeout_s bounds it.
        earlier = [(e, f) for e in self.pool.engines for f in e.in_flight()] if self.rank == 0 else []
        names = sorted({e.name for e, _ in earlier})
        wait_together(lambda: any(not f.done() for _, f in earlier), self.pool.timeout_s if self.rank == 0 else 0,
                      f"weight sync v{version}: waiting for {names} to finish their earlier requests")
        futures = []
        if self.rank == 0:
            dead = [e.status() for e in self.pool.engines if e.dead]
            if dead:  # fail before any collective rather than inside one
                raise EngineDied(f"weight sync v{version}: {'; '.join(dead)}")
            futures = self.pool.call_all("receive_weights")
            send_obj(self.pg, header, self.device)
        gather_s, bcast_s = self._stream(named, owner, layout, slots, sizes, per_param)
        stats = {"version": version, "mode": header["mode"], "gather_s": gather_s, "broadcast_s": bcast_s,
                 "bytes": sum(s.nbytes for s in slots), "buckets": len(sizes)}
        if self.rank == 0:
            replies = self.pool.wait(futures, self.timeout_s, "receive_weights")
            stale = [(e.name, r["version"]) for e, r in zip(self.pool.engines, replies) if r["version"] != version]
            if stale:
                raise RuntimeError(f"weight sync v{version}: engines report other versions: {stale}")
            stats["load_s"] = max(r["load_s"] for r in replies)
            stats["recv_s"] = max(r["recv_s"] for r in replies)
            stats["engine_bytes"] = [r.get("recv_bytes") for r in replies]  # as counted on the engine side
            stats["engine_dtypes"] = [r.get("recv_dtypes") for r in replies]
        stats["total_s"] = time.perf_counter() - t0
        stats["gbps"] = stats["bytes"] / stats["total_s"] / 1e9
        self.history.append(stats)
        if self.log and self.rank == 0:
            print(f"weight sync v{version} ({stats['mode']}): {stats['bytes'] / 2**20:.1f} MiB in {len(sizes)} "
                  f"{'tensors' if per_param else 'buckets'}: gather {gather_s:.3f}s broadcast {bcast_s:.3f}s load {stats['load_s']:.3f}s "
                  f"total {stats['total_s']:.3f}s ({stats['gbps']:.2f} GB/s)", flush=True)
        return stats

    def _stream(self, named, owner: list[int], layout, slots: list[Slot], sizes: list[int],
                per_param: bool) -> tuple[float, float]:
        """Gather each parameter (all ranks), once; rank 0 packs its checkpoint-layout parts and
        broadcasts. Returns (gather_s, broadcast_s)."""
        gather_s = bcast_s = 0.0
        inflight: deque = deque()  # (buffer, work): buffers stay referenced until their broadcast ends
        buf, buf_idx, gathered, parts = None, -1, -1, {}
        per_bucket = [0] * len(sizes)
        for slot in slots:
            per_bucket[slot.bucket] += 1
        for j, slot in zip(owner, slots):
            t = time.perf_counter()
            if j != gathered:
                # Cast the local shard, then gather: the same values as gather-then-cast (rounding is per
                # element), with half the all-gather bytes when fp32 masters travel as bf16.
                name, p = named[j]
                local = p.detach().to(slot.dtype)
                full = local.full_tensor() if hasattr(local, "full_tensor") else local  # collective on FSDP params
                gathered, parts = j, (dict(layout.to_checkpoint(name, full)) if self.rank == 0 else {})
                del full
            gather_s += time.perf_counter() - t
            if self.rank != 0:
                continue
            t = time.perf_counter()
            part = parts.pop(slot.name)
            if per_param:  # the original's scheme: metadata, then the tensor itself, per parameter
                send_obj(self.pg, [slot.name, _dtype_name(slot.dtype), list(slot.shape)], self.device)
                self.pg.broadcast(part.to(self.device, slot.dtype).contiguous(), 0).wait()
            else:
                if slot.bucket != buf_idx:
                    if buf is not None:
                        inflight.append((buf, self.pg.broadcast(buf, 0)))
                    while len(inflight) >= 2:
                        inflight.popleft()[1].wait()
                    buf, buf_idx = None, slot.bucket
                flat = part.detach().to(self.device, slot.dtype).contiguous().view(-1).view(torch.uint8)
                if per_bucket[slot.bucket] == 1:  # a lone tensor is its own bucket: send it, no copy
                    buf = flat
                else:
                    if buf is None:
                        buf = self._bucket_buffer(slot.bucket, sizes[slot.bucket], max(sizes))
                    buf[slot.offset : slot.offset + slot.nbytes].copy_(flat)
            bcast_s += time.perf_counter() - t
            del part
        if self.rank == 0 and buf is not None:
            t = time.perf_counter()
            inflight.append((buf, self.pg.broadcast(buf, 0)))
            for _, work in inflight:
                work.wait()
            bcast_s += time.perf_counter() - t
        return gather_s, bcast_s

    def _bucket_buffer(self, bucket: int, size: int, capacity: int) -> torch.Tensor:
        """Alternate between two buffers kept across syncs. Measured here: a freshly allocated
        64 MiB host buffer makes a gloo broadcast 5-8x slower (first-touch page faults), which made
        fresh-buffer bucketing slower than per-parameter sends."""
        if len(self._ring) < 2 or self._ring[0].numel() < capacity:  # only at a sync's first bucket
            self._ring = [torch.empty(capacity, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._ring[bucket % 2][:size]

    def close(self) -> None:
        """Every rank; rank 0 tears the group down with the engines. Call before pool.shutdown()."""
        if self.rank == 0 and self.pg is not None:
            futures = self.pool.call_all("close_sync")
            close_group(self.pg)
            self.pool.wait(futures, self.timeout_s, "close_sync")
            self.pg = None
            self.store = None
