"""Checkpoints that survive anything (train/sft.py + tulu/checkpoint.py), 2 gloo ranks, fp32:
kill -9 mid-step then resume equals the uninterrupted curve; resume at 1 and 4 ranks; incomplete
checkpoints are skipped; keep_last_n; SIGTERM saves a resumable checkpoint; nothing pickled; a
killed launcher takes its ranks with it, one run per output_dir, and three such kills stitch into
the uninterrupted curve."""
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TORCHRUN, read_metrics, script_env, torchrun

STEPS = 10


def _args(out, bs=2, ga=2, extra=()):
    return ["--dataset_mixer_list", "tulu/synth-sft", "160", "--max_train_steps", str(STEPS), "--learning_rate", "3e-3",
            "--max_seq_length", "128", "--per_device_train_batch_size", str(bs), "--gradient_accumulation_steps", str(ga),
            "--mixed_precision", "fp32", "--checkpointing_steps", "2", "--keep_last_n_checkpoints", "3",
            "--output_dir", str(out), *extra]


def _by_step(out):
    """Loss per step; a resumed run's entries replace the interrupted run's."""
    return {m["step"]: m["train/loss"] for m in read_metrics(out)}


def _popen(out, nproc=2):
    cmd = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", str(REPO / "train/sft.py"), *_args(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(proc):
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(m["step"] >= step for m in read_metrics(out)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    torchrun("train/sft.py", _args(out))
    return out


@pytest.mark.slow
def test_checkpoints_are_complete_pruned_and_pickle_free(uninterrupted):
    root = uninterrupted / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_6", "step_8"]  # keep_last_n = 3
    for p in root.iterdir():
        assert (p / "COMPLETE").exists()
        assert {f.suffix for f in p.iterdir()} <= {".safetensors", ".json", ""}, list(p.iterdir())
        assert json.loads((p / "trainer_state.json").read_text())["samples_seen"] == int(p.name[5:]) * 8
    for f in list(uninterrupted.rglob("*")):  # no pickle anywhere a user may load
        assert f.suffix not in (".bin", ".pt", ".pkl", ".pth", ".distcp"), f


@pytest.mark.slow
def test_kill_9_mid_step_then_auto_resume_matches_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _popen(out)
    _wait_for_step(out, 7, proc)  # checkpoint step_6 exists; step 8 is in flight
    os.kill(_workers(proc)[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    done = torchrun("train/sft.py", _args(out))  # same command: resume_from_checkpoint defaults to auto
    assert "resumed from" in done.stdout
    full, resumed = _by_step(uninterrupted), _by_step(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(full[step] - resumed[step]) <= 1e-6, (step, full[step], resumed[step])


@pytest.mark.slow
@pytest.mark.parametrize("nproc, bs, ga", [(1, 2, 4), (4, 2, 1)])
def test_resume_at_another_world_size(uninterrupted, tmp_path, nproc, bs, ga):
    out = tmp_path / f"w{nproc}"
    shutil.copytree(uninterrupted / "checkpoints" / "step_6", out / "checkpoints" / "step_6")
    # a newer checkpoint truncated mid-write: skipped with a warning, step_6 is used
    broken = out / "checkpoints" / "step_8"
    shutil.copytree(uninterrupted / "checkpoints" / "step_8", broken)
    (broken / "COMPLETE").unlink()
    first = sorted(broken.glob("model-rank*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:100])
    done = torchrun("train/sft.py", _args(out, bs, ga), nproc=nproc)
    assert "ignoring incomplete checkpoint" in done.stdout and "step 6" in done.stdout
    full, resumed = _by_step(uninterrupted), _by_step(out)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        assert abs(full[step] - resumed[step]) <= 1e-5, (nproc, step, full[step], resumed[step])


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "term"
    proc = _popen(out)
    _wait_for_step(out, 3, proc)
    for pid in _workers(proc):  # what a cluster scheduler does at preemption: SIGTERM to every task
        os.kill(pid, signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "stopped by signal" in text
    stopped_at = max(m["step"] for m in read_metrics(out))
    assert (out / "checkpoints" / f"step_{stopped_at}" / "COMPLETE").exists()
    torchrun("train/sft.py", _args(out))
    full, resumed = _by_step(uninterrupted), _by_step(out)
    for step in range(stopped_at + 1, STEPS + 1):
        assert abs(full[step] - resumed[step]) <= 1e-6, (step, full[step], resumed[step])


@pytest.mark.slow
def test_hf_export_reproduces_the_trained_weights_logits(uninterrupted):
    """The final export against the trainer's own fp32 weights at the last step (read back from the
    step_10 rank files, rows stitched by their offsets): same logits to 1e-5."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = {}
    for f in sorted((uninterrupted / "checkpoints" / "step_10").glob("model-rank*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = json.loads(h.metadata()["rows"])
            for name in h.keys():
                if "::" not in name:
                    rows.setdefault(name, []).append((meta[name][0], h.get_tensor(name)))
    state = {n: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]) for n, parts in rows.items()}
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(uninterrupted), dtype=torch.float32)
    trained.load_state_dict(state, strict=True)
    exported = AutoModelForCausalLM.from_pretrained(uninterrupted, dtype=torch.float32)
    assert {f.suffix for f in uninterrupted.glob("model*")} == {".safetensors"}
    x = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        diff = (trained(input_ids=x).logits - exported(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-5, diff


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_killed_launcher_takes_its_ranks_and_an_output_dir_has_one_writer(tmp_path):
    """kill -9 of torchrun alone (an OOM killer's or a scheduler's way): its ranks, each in a session of
    its own, used to train on, save and prune beside the resumed run. Now: a second run on the same
    output_dir stops at start-up naming the holder; after the kill no rank lives 15 s later; the
    newest complete checkpoint resumes."""
    out = tmp_path / "run"
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", str(REPO / "train/sft.py"),
                      *_args(out, extra=["--max_train_steps", "5000"])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for_step(out, 3, proc)  # step_2 is complete
        ranks = _workers(proc)
        second = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=180)
        assert second.returncode != 0
        said = second.stdout + second.stderr
        assert f"--output_dir {out} is in use by another run (host " in said, said[-3000:]
        assert any(f" pid {pid} since " in said for pid in ranks), (ranks, said[-3000:])
        assert proc.poll() is None  # the first run went on untouched
        _kill_launcher(proc)
    finally:
        for pid in _workers(proc) if proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    killed_at = max(m["step"] for m in read_metrics(out))
    assert killed_at < 5000  # it was stopped, not finished
    time.sleep(2)
    assert max(m["step"] for m in read_metrics(out)) == killed_at  # and nothing wrote on after the kill
    assert not list((out / "checkpoints").glob("*.deleting"))
    # the lock died with its holder; the newest complete checkpoint resumes (a shorter run: the same schedule
    # would take minutes)
    done = torchrun("train/sft.py", _args(out, extra=["--max_train_steps", str(killed_at + 4)]))
    assert "resumed from" in done.stdout
    assert max(m["step"] for m in read_metrics(out)) == killed_at + 4


def _kill_launcher(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun alone, then wait until none of its ranks runs (at most 15 s)."""
    ranks = _workers(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while any(map(_alive, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    assert ranks and not any(map(_alive, ranks)), ("orphaned ranks", [p for p in ranks if _alive(p)])


@pytest.mark.slow
def test_three_launcher_kills_stitch_into_the_uninterrupted_curve(uninterrupted, tmp_path):
    """The launcher SIGKILLed three times at (seeded) random moments after steps 3, 5 and 7, some
    landing in a save (one every 2 steps); each time no rank outlives it, and the same command resumes
    from the newest complete checkpoint; the last resume runs on 1 rank (same global batch). The
    stitched curve equals the uninterrupted 2-rank run's to 1e-5."""
    out, rng = tmp_path / "chaos", random.Random(0)
    for target in (3, 5, 7):
        proc = _popen(out)
        try:
            _wait_for_step(out, target, proc)
            time.sleep(rng.uniform(0.0, 0.2))
            assert proc.poll() is None, "the run finished before its kill"
            _kill_launcher(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not list((out / "checkpoints").glob("*.deleting"))
    done = torchrun("train/sft.py", _args(out, 2, 4), nproc=1)
    assert "resumed from" in done.stdout
    full, stitched = _by_step(uninterrupted), _by_step(out)
    assert sorted(stitched) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(full[step] - stitched[step]) <= 1e-5, (step, full[step], stitched[step])


def test_output_dir_lock_and_lease(tmp_path):
    """In-process: a second taker of a held folder is refused naming the holder (flock); where flock is
    not enforced, a lease renewed by another host within 60 s refuses too, an expired one does not."""
    import socket

    from tulu.output_dir import hold_output_dir

    held = tmp_path / "held"
    hold_output_dir(held, is_main=True)
    lease = json.loads((held / ".lease").read_text())
    assert lease["pid"] == os.getpid() and time.time() - lease["beat"] < 5
    with pytest.raises(RuntimeError, match=f"in use by another run \\(host {socket.gethostname()} pid {os.getpid()} since"):
        hold_output_dir(held, is_main=True)  # a second open file description: flock refuses it
    for age, refused in ((5, True), (120, False)):
        folder = tmp_path / f"nfs{age}"  # no flock holder: the lease alone decides
        folder.mkdir()
        (folder / ".lease").write_text(json.dumps({"host": "node-7", "pid": 4242, "beat": time.time() - age}))
        if refused:
            with pytest.raises(RuntimeError, match="host node-7 pid 4242, its lease on this folder renewed 5 s ago"):
                hold_output_dir(folder, is_main=True)
        else:
            hold_output_dir(folder, is_main=True)
            assert json.loads((folder / ".lease").read_text())["pid"] == os.getpid()
