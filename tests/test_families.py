"""Every model family people post-train, tiny and random (tests/families.py): Llama, Qwen3, OLMo 2,
Mistral, Phi-3, Gemma 2, Qwen3-MoE, OLMoE and a tied-embedding Qwen2.

- The attention each family runs with, and packed rows equal to each document alone in every attention
  implementation the CPU runs (sdpa, eager, flex; forward).
- The checkpoint layout: a fused in-memory parameter (MoE experts) to and from its per-expert tensors.
- Two torchrun launches for all families: load under FSDP2 (logits equal transformers'
  from_pretrained), export (the layout save_pretrained writes) and resume at another world size; then
  every stage's real script for two steps each (RLVR: GRPO with the engines' sync check every step).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_metrics, script_env, torchrun
from families import FAMILIES, write_family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for name in FAMILIES:
        write_family(name, root / name)
    return root


def test_attention_fits_the_model(models):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tulu.model import attention_for

    chosen = {}
    for name in FAMILIES:
        config = AutoConfig.from_pretrained(models / name)
        chosen[name] = attention_for(config, AutoModelForCausalLM._model_mapping[type(config)], "sdpa")
    # Gemma 2 soft-caps its attention scores, which sdpa cannot: eager; every other family keeps sdpa
    assert chosen == {name: "eager" if name == "gemma2" else "sdpa" for name in FAMILIES}


def test_sdpa_would_skip_gemma2_soft_capping(models):
    """Why Gemma 2 runs eager: with large attention scores sdpa's output leaves eager's (soft-capped)."""
    from transformers import AutoModelForCausalLM

    x = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("sdpa", "eager"):
        m = AutoModelForCausalLM.from_pretrained(models / "gemma2", dtype=torch.float32, attn_implementation=impl)
        with torch.no_grad():
            for layer in m.model.layers:  # scores far past the cap (50)
                layer.self_attn.q_proj.weight.mul_(30)
                layer.self_attn.k_proj.weight.mul_(30)
            logits[impl] = m(input_ids=x, use_cache=False).logits
    assert (logits["sdpa"] - logits["eager"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qwen3", "mistral", "phi3", "gemma2", "olmoe"])
def test_packed_rows_equal_each_document_alone_in_every_cpu_attention(models, name):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 300, (n,), generator=g) for n in (7, 11, 5)]
    ids = torch.cat(docs)[None]  # (1, 23): one padding-free row
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]  # restart at each document
    tried = []
    # flex compiles its kernel on first use (~15 s on CPU): one family checks it (Gemma 2's soft-capping)
    for impl in ("sdpa", "eager") + (("flex_attention",) if name == "gemma2" else ()):
        m = AutoModelForCausalLM.from_pretrained(models / name, dtype=torch.float32, attn_implementation=impl)
        with torch.no_grad():
            packed = m(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
            alone = torch.cat([m(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        assert (packed - alone).abs().max() < 1e-5, (name, impl)
        tried.append(impl)
    assert tried == ["sdpa", "eager"] + (["flex_attention"] if name == "gemma2" else [])


def test_fused_experts_to_checkpoint_layout_and_back(models):
    """Qwen3-MoE keeps each layer's experts fused (experts, 2·I, H); its files, and vLLM, hold one
    gate_proj / up_proj / down_proj per expert. The layout writes exactly save_pretrained's tensors and
    assembles them back; a TorchEngine takes weights in that layout."""
    from transformers import AutoModelForCausalLM

    from rollout.engine import TorchEngine
    from tulu.layouts import Layout

    folder = models / "qwen3_moe"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    layout = Layout(model)
    files = load_file(folder / "model.safetensors")  # what save_pretrained wrote
    params = dict(model.named_parameters())
    written = {}
    for name, p in params.items():
        shapes = dict(layout.checkpoint_shapes(name, tuple(p.shape)))
        for ckpt_name, t in layout.to_checkpoint(name, p.detach()):
            assert tuple(t.shape) == shapes[ckpt_name]
            written[ckpt_name] = t
    assert written.keys() == files.keys() and "model.layers.1.mlp.experts.3.up_proj.weight" in written
    assert all(torch.equal(written[k], files[k]) for k in files)
    rebuilt = dict(layout.from_checkpoint(iter(files.items()), params))
    assert rebuilt.keys() == params.keys() and all(torch.equal(rebuilt[k], params[k]) for k in params)

    engine = TorchEngine(str(folder))
    moved = {k: v + 0.5 for k, v in files.items()}  # other weights, in the checkpoint layout
    engine.load_weights(iter(moved.items()), version=7)
    got = {k: v for name, p in engine.model.named_parameters() for k, v in layout.to_checkpoint(name, p)}
    assert engine.version == 7 and all(torch.equal(got[k], moved[k]) for k in moved)


@pytest.mark.slow
def test_load_export_and_resume_at_another_world_size(models, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    out = tmp_path / "layouts"
    torchrun("tests/scripts/layouts_check.py", ["--models", str(models), "--out", str(out), "save"], timeout=600)
    subprocess.run([sys.executable, str(REPO / "tests/scripts/layouts_check.py"), "--models", str(models), "--out",
                    str(out), "load"], cwd=REPO, env=script_env(), check=True, capture_output=True, timeout=600)
    gaps = json.loads((out / "save.json").read_text())
    assert set(gaps) == set(FAMILIES) and max(gaps.values()) < 1e-5, gaps  # build = from_pretrained
    x = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    for name in FAMILIES:
        exported = load_file(out / name / "export" / "model.safetensors")
        original = load_file(models / name / "model.safetensors")
        assert exported.keys() == original.keys(), name  # the layout save_pretrained writes
        reloaded = load_file(out / name / "reloaded" / "model.safetensors")  # 2 ranks -> 1 rank resume
        assert all(torch.equal(exported[k], reloaded[k]) for k in exported), name
        assert any(not torch.equal(exported[k], original[k]) for k in exported), name  # the step moved it
        a = AutoModelForCausalLM.from_pretrained(out / name / "export", dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(out / name / "reloaded", dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits), name


@pytest.mark.slow
def test_every_stage_runs_on_every_family(models, tmp_path):
    out = tmp_path / "runs"
    proc = torchrun("tests/scripts/families_run.py", ["--models", str(models), "--out", str(out)], timeout=1500)
    assert f"done: {len(FAMILIES)} families x 4 stages" in proc.stdout
    for name in FAMILIES:
        for stage, key in (("sft", "train/loss"), ("dpo", "train/loss"), ("rm", "train/rm/loss"),
                           ("rlvr", "loss/policy_avg")):
            logged = [m for m in read_metrics(out / name / stage) if key in m]
            assert len(logged) == 2 and all(torch.isfinite(torch.tensor(m[key])) for m in logged), (name, stage)
        # the engine (a TorchEngine, fp32) holds the trainer's weights after every sync: the weight sync's
        # checkpoint layout (per-expert MoE tensors) and the engine's attention match the trainer's
        gaps = [m["debug/sync_check_gap"] for m in read_metrics(out / name / "rlvr") if "debug/sync_check_gap" in m]
        assert len(gaps) == 2 and max(gaps) < 1e-5, (name, gaps)
