"""Symbolic answer equivalence in a persistent worker process, with a hard timeout.

Symbolic math can explode (`\\boxed{9^{9^{9^9}}}` sends sympy into a bignum it never
finishes) and the usual guard, `signal.alarm`, works only in a process's main thread,
while the RL trainer verifies rollouts from a background thread. So the engine,
math-verify (Kydlíček et al., huggingface/Math-Verify: LaTeX/expression parsing to sympy
plus equivalence rules), runs in a child process started with `subprocess` (no fork of
the trainer, no re-import of its `__main__`). Each request is one JSON line
`{"gold": ..., "pred": ...}` on the child's stdin and one line `{"equal": bool}` back.
The parent waits at most `timeout` seconds; past that the child is killed and the pair
scores "not equal"; the next request starts a fresh child. Requests are serialized
by a lock, so `equivalent` is safe to call from any thread. Inside the child,
math-verify's own alarm-based timeouts (main thread there) cut most cases short first.

Nothing is evaluated as Python: math-verify parses LaTeX into sympy objects.
Run as a script, this file is the child's loop.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

DEFAULT_TIMEOUT_S = 5.0


class SymbolicWorker:
    """Owns one child process; `equivalent(gold, pred)` with a per-call timeout."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.restarts = 0  # children killed on timeout or crash (a metric worth logging)

    def _start(self) -> subprocess.Popen:
        inner = max(1, int(self.timeout / 3))  # math-verify's own parse / verify limits
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(inner)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # math-verify logs parse failures
        )
        self._buf = b""
        return self._proc

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _readline(self, proc: subprocess.Popen, deadline: float) -> bytes | None:
        fd = proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None  # timed out
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # child died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def equivalent(self, gold: str, pred: str, timeout: float | None = None) -> bool:
        """True when math-verify finds `pred` equal to `gold`; False on any failure."""
        request = (json.dumps({"gold": gold, "pred": pred}) + "\n").encode()
        with self._lock:
            # The first request also pays the child's start-up (sympy import, ~1-2 s).
            started = self._proc is None or self._proc.poll() is not None
            proc = self._start() if started else self._proc
            deadline = time.monotonic() + (timeout or self.timeout) + (30.0 if started else 0.0)
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.close()
                return False
            line = self._readline(proc, deadline)
            if line is None:
                self.restarts += 1
                self.close()
                return False
            return bool(json.loads(line).get("equal", False))


_default: SymbolicWorker | None = None
_default_lock = threading.Lock()


def default_worker() -> SymbolicWorker:
    """The process-wide worker (started lazily, killed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SymbolicWorker()
            atexit.register(_default.close)
        return _default


def _serve(inner_timeout: int) -> None:
    """Child loop: read requests, answer with math-verify's verdict."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    from math_verify import parse, verify

    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parse(f"${req['gold']}$", parsing_timeout=inner_timeout)
            pred = parse(f"${req['pred']}$", parsing_timeout=inner_timeout)
            equal = bool(gold and pred and verify(gold, pred, timeout_seconds=inner_timeout))
        except Exception:  # any parse/verify failure means "not shown equal"
            equal = False
        proto.write(json.dumps({"equal": equal}) + "\n")
        proto.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
