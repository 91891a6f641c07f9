"""One writer per output_dir. Two runs writing into one folder (a rerun beside an orphan of a killed
run, a second job started by mistake) would interleave checkpoints and exports; rank 0 holds the
folder for the whole run, by an flock and, where a filesystem ignores flock, by a lease.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

_held: list = []  # the open lock files of this process: the kernel releases them when it exits
LEASE_BEAT_S, LEASE_TTL_S = 10.0, 60.0  # the lease is renewed every 10 s; one not renewed for 60 s is dead


def hold_output_dir(output_dir: str | os.PathLike, is_main: bool) -> None:
    """One writer per output_dir. Rank 0 takes an exclusive flock on output_dir/.lock for the whole
    run (released by the kernel when the process ends, even by SIGKILL: no stale lock to clean up);
    for filesystems that do not honour flock (some NFS setups) it also renews a lease,
    output_dir/.lease, every 10 s. Every rank raises, naming the holder, when another run has the
    lock or a live lease (renewed within 60 s; on this host, held by a living pid). Collective."""
    from tulu.dist import broadcast_object

    error = broadcast_object(_take_output_dir(Path(output_dir)) if is_main else None)
    if error:
        raise RuntimeError(error)


def _take_output_dir(folder: Path) -> str | None:
    """Rank 0's half of hold_output_dir: None when taken, else the error."""
    import fcntl
    import socket
    import threading

    folder.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    busy = (f"--output_dir {folder} is in use by another run ({{}}); wait for it to end, stop it, or choose "
            f"another --output_dir")
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that did not say"
        f.close()
        return busy.format(holder)
    lease = _live_lease(folder / ".lease", me)
    if lease is not None:
        f.close()
        return busy.format(f"host {lease['host']} pid {lease['pid']}, its lease on this folder renewed "
                           f"{time.time() - lease['beat']:.0f} s ago; this filesystem did not enforce the flock")
    f.seek(0)
    f.truncate()
    f.write(f"host {me['host']} pid {me['pid']} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held.append(f)

    def renew() -> None:
        tmp = folder / f".lease.{me['pid']}"
        tmp.write_text(json.dumps({**me, "beat": time.time()}))
        os.replace(tmp, folder / ".lease")  # atomic: a reader sees the old lease or the new one

    def keep_renewing() -> None:
        while True:
            time.sleep(LEASE_BEAT_S)
            try:
                renew()
            except OSError:  # the folder is gone or unwritable: the run's own saves will say so
                pass

    renew()
    threading.Thread(target=keep_renewing, name="output-dir-lease", daemon=True).start()
    return None


def _live_lease(path: Path, me: dict) -> dict | None:
    """The lease at `path` if another living run holds it, else None (absent, unreadable, ours, its
    pid dead on this host, or not renewed for LEASE_TTL_S)."""
    try:
        lease = json.loads(path.read_text())
        host, pid, beat = str(lease["host"]), int(lease["pid"]), float(lease["beat"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == me["host"]:
        if pid == me["pid"]:
            return None
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None  # exited, not yet reaped (its flock is already released)
        except (ProcessLookupError, FileNotFoundError):  # gone (FileNotFoundError: between the two looks)
            return None
        except (PermissionError, OSError, IndexError):
            pass  # alive (another user's), or no /proc to tell
    return lease if time.time() - beat < LEASE_TTL_S else None
