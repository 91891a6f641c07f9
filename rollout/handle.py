"""The pool's side of one engine process: its control connection, the requests in flight, a reader
thread that resolves them, and what happens when the engine dies (every pending request fails with
EngineDied, naming the engine, its exit code and its last log lines; what it started is killed).
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path

from rollout.errors import EngineDied, EngineError


class EngineHandle:
    """The pool's side of one engine: a connection, pending requests, and a reader thread."""

    def __init__(self, conn, hello: dict, proc: subprocess.Popen | None, log_path: Path | None):
        self.conn, self.proc, self.log_path = conn, proc, log_path
        self.name, self.pid = hello["name"], hello["pid"]
        self.sync_ranks = hello["sync_ranks"]  # workers that join the weight-sync group (TP size)
        self.version = hello["version"]
        self.runtime = hello.get("runtime")  # torch / NCCL / vLLM versions of the engine's environment
        self.device = hello.get("device", "cpu")  # where its weights live: the sync backend depends on it
        self.dead: str | None = None  # why, once dead
        self._closing = False
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, Future]] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._read, name=f"rollout-{self.name}", daemon=True).start()

    def request(self, op: str, *args) -> Future:
        fut: Future = Future()
        with self._lock:
            if self.dead:
                fut.set_exception(EngineDied(self.dead))
                return fut
            rid = next(self._ids)
            self._pending[rid] = (op, fut)
            try:
                self.conn.send((rid, op, args))
            except OSError as e:  # connection gone: the reader thread reports why
                self._pending.pop(rid)
                fut.set_exception(EngineDied(f"rollout engine {self.name}: cannot send {op!r}: {e}"))
        return fut

    def in_flight(self) -> list[Future]:
        """Requests sent and not answered yet (a weight sync waits for them before its collectives)."""
        with self._lock:
            return [fut for _, fut in self._pending.values()]

    def _read(self) -> None:
        while True:
            try:
                rid, ok, payload = self.conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: closed by shutdown() from another thread
                return self._mark_dead()
            with self._lock:
                op, fut = self._pending.pop(rid)
            if ok:
                if op == "receive_weights":
                    self.version = payload["version"]
                fut.set_result(payload)
            else:
                fut.set_exception(EngineError(f"rollout engine {self.name} failed in {op!r}:\n{payload}"))

    def _mark_dead(self) -> None:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            kill_group(self.proc)  # what the engine started (vLLM's engine core, its workers) goes with it
        why = "was shut down" if self._closing else "died"
        self.dead = (f"rollout engine {self.name} (pid {self.pid}) {why}"
                     f"{'' if code is None else f', exit code {code}'}{self.log_tail()}")
        with self._lock:
            pending, self._pending = self._pending, {}
        for op, fut in pending.values():
            fut.set_exception(EngineDied(f"{self.dead}\n(while serving {op!r})"))

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last log lines ({self.log_path}):\n  " + "\n  ".join(tail) if tail else ""

    def status(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        return self.dead or (f"rollout engine {self.name} (pid {self.pid}) "
                             f"{'running' if code is None else f'exited with code {code}'}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a local engine's process group: the engine (started in a session of its own) and every
    process it started. vLLM's engine core outlives a killed engine otherwise (seen: still polling a
    core 1 h 42 min later, deaf to SIGTERM)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
