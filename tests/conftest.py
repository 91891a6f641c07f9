"""Shared test helpers: launching scripts under torchrun with a timeout, and the shared data path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def script_env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # prepend
    env.pop("RANK", None)
    return env


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun --standalone (extra `env` variables on top of script_env()); fail
    the test with its output on error or timeout."""
    cmd = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", str(REPO / script), *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=script_env() | (env or {}), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} timed out after {timeout}s\n{(e.stdout or b'')[-3000:]}\n{(e.stderr or b'')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{script} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n"
                    f"{proc.stderr[-6000:]}{fatal_stacks(proc.stderr)}")
    return proc


def fatal_stacks(text: str) -> str:
    """A rank killed by a signal prints every thread's Python stack first ("Fatal Python error"), then
    a long list of extension modules that pushes them out of any tail: the first such block, or ""."""
    at = text.find("Fatal Python error")
    return f"\nFIRST FATAL ERROR:\n{text[at:at + 6000]}" if at >= 0 else ""


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} is absent (real-data tests need ../shared/data)")


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory) -> Path:
    """The SFT default run (`torchrun --nproc_per_node 2 train/sft.py`, no flags but the output dir),
    run once per test session; later stages start from its exported model."""
    out = tmp_path_factory.mktemp("stages") / "sft"
    torchrun("train/sft.py", ["--output_dir", str(out), "--logging_steps", "10"], timeout=900)
    return out


def write_tied_tiny(dst: Path) -> Path:
    """The tiny model with tied embeddings (lm_head = embed_tokens, as SmolLM2, Qwen2-0.5B and Llama 3.2
    1B/3B have), its other weights the tiny model's, saved with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tulu.tiny import tiny_dir

    config = AutoConfig.from_pretrained(tiny_dir())
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    state = AutoModelForCausalLM.from_pretrained(tiny_dir()).state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(tiny_dir()).save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def tied_tiny(tmp_path_factory) -> Path:
    return write_tied_tiny(tmp_path_factory.mktemp("tied") / "tiny-tied")
