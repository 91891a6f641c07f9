"""The Hugging Face export: streamed into planned shards, loadable by transformers, exact.

The embedded tiny model is built with FSDP2 on 2 ranks and exported; the folder is compared with
the tiny model's own safetensors file, read independently with safetensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import REPO, TORCHRUN
from tulu.export import plan_shards
from tulu.tiny import tiny_dir


def export(out: Path, max_shard_bytes: int, *extra: str) -> None:
    cmd = TORCHRUN + ["--standalone", "--nproc_per_node=2", str(REPO / "tests/scripts/export_check.py"),
                      "--out", str(out), "--max_shard_bytes", str(max_shard_bytes), *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]


def source_weights() -> dict[str, torch.Tensor]:
    with safe_open(str(tiny_dir() / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_sharded_export_is_exact_and_loads(tmp_path):
    src = source_weights()
    largest = max(t.numel() * t.element_size() for t in src.values())
    export(tmp_path / "fp32", largest)  # shard size = the largest tensor: several files
    index = json.loads((tmp_path / "fp32" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors"), files
    assert set(index["weight_map"]) == set(src)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in src.values())
    got = {}
    for name in files:
        assert (tmp_path / "fp32" / name).stat().st_size <= largest + 4096  # + its header
        with safe_open(str(tmp_path / "fp32" / name), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert not list((tmp_path).glob(".*tmp-export"))  # published: no temporary folder left


def test_bf16_export_single_file(tmp_path):
    export(tmp_path / "bf16", 10**9, "--dtype", "bf16")
    assert not (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    src = source_weights()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k].to(torch.bfloat16)) for k in src)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_plan_shards_keeps_order_and_bounds():
    f32 = torch.float32
    specs = [("a", f32, (10,)), ("b", f32, (30,)), ("c", f32, (5,)), ("d", f32, (100,)), ("e", f32, ())]
    assert plan_shards(specs, 160) == [[0, 1], [2], [3], [4]]  # 40+120 fits; c then d would not; d alone
    assert plan_shards(specs, 10**6) == [[0, 1, 2, 3, 4]]
