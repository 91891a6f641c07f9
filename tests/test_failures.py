"""A crash on one rank ends every rank (no hang) and its exception is shown once.

The real scripts run under torchrun with one function made to raise on one rank
(tests/scripts/fail_on_rank.py); the checks read torchrun's combined output.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import REPO, TORCHRUN, fatal_stacks, script_env

INJECTOR = REPO / "tests" / "scripts" / "fail_on_rank.py"


def run_failing(module: str, function: str, rank: int, call: int, args: list[str], timeout: int = 240):
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", str(INJECTOR), module, function, str(rank), str(call),
                      "--", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)
    return proc, proc.stdout + proc.stderr, time.monotonic() - start


def assert_reported_once(proc, out: str, rank: int) -> None:
    assert proc.returncode != 0, out[-3000:]
    message = f"ValueError: injected failure on rank {rank}"
    assert out.count(message) == 1, out[-6000:] + fatal_stacks(out)  # in torchrun's summary only
    root = out.split("Root Cause (first observed failure):", 1)[1]
    assert f"rank      : {rank} " in root and message in root, root
    other = 1 - rank
    assert f"[rank{other}]: Traceback" not in out, out[-6000:]  # the other rank prints no traceback of its own
    others = out.split("Root Cause")[0].split("Failures:")[-1]  # torchrun's entries for the other ranks
    assert "Traceback" not in others, others  # ... and records none (it stopped because of the root cause)


def open_files_under(folder: Path) -> list[str]:
    """Processes (pid: path) that hold a file under `folder` open."""
    held = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith(str(folder)):
                    held.append(f"{fd_dir.parent.name}: {target}")
        except OSError:  # the process exited or is not ours
            continue
    return held


def test_sft_exception_on_one_rank_stops_all_and_is_shown_once(tmp_path):
    proc, out, took = run_failing("train.sft", "sft_loss_from_logprobs", 1, 3,  # the chunked head's loss
                                  ["--output_dir", str(tmp_path / "sft"), "--max_train_steps", "20"])
    assert_reported_once(proc, out, rank=1)
    assert "[rank 1] failed with ValueError" in out
    assert not (tmp_path / "sft" / "config.json").exists()  # no export from a failed run
    print(f"sft: failed run ended in {took:.1f}s")


def test_rlvr_exception_on_pool_rank_stops_trainers_and_engines(tmp_path):
    out_dir = tmp_path / "rlvr"
    proc, out, took = run_failing("train.rlvr", "ppo_value_loss", 0, 2, [
        "--output_dir", str(out_dir), "--total_episodes", "512", "--num_evals", "0", "--async_mode", "True"])
    assert_reported_once(proc, out, rank=0)
    assert (out_dir / "engine_logs").exists(), out[-3000:]
    deadline = time.monotonic() + 10  # engines poll their parent once a second
    while (held := open_files_under(out_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not held, f"processes still running after the trainer failed: {held}"
    print(f"rlvr: failed run ended in {took:.1f}s")
