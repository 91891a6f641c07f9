"""MFU is logged by every training script: perf/mfu = model FLOPs per second / peak.

No GPU here, so $TULU_PEAK_TFLOPS supplies a peak (the same override a GPU missing from the
vendor table uses). The FLOPs per token are recomputed here from the exported model's config with
the PaLM formula (6N + 12·layers·hidden·seq), independently of tulu.metrics; the check is that the
logged MFU equals logged tokens/s × those FLOPs (× 4/3 with a live DPO reference, whose forward is
a third of a training step) / peak, to float rounding.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import read_metrics, torchrun

PEAK_TFLOPS = 0.001  # 1 GFLOP/s: CPU-sized, so the MFU values are O(1)


def palm_flops(folder, seq: int) -> float:
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq


def logged_perf(out) -> list[dict]:
    rows = [m for m in read_metrics(out) if "perf/tokens_per_s_per_device" in m]
    assert rows and all("perf/mfu" in m for m in rows), rows
    return rows


@pytest.fixture(autouse=True)
def peak(monkeypatch):
    monkeypatch.setenv("TULU_PEAK_TFLOPS", str(PEAK_TFLOPS))


def test_sft_and_dpo_log_mfu(tmp_path):
    torchrun("train/sft.py", ["--output_dir", str(tmp_path / "sft"), "--max_train_steps", "2", "--logging_steps", "1",
                              "--max_seq_length", "128"])
    flops = palm_flops(tmp_path / "sft", 128)
    for m in logged_perf(tmp_path / "sft"):
        assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s_per_device"] * flops / (PEAK_TFLOPS * 1e12), rel=1e-9)
    for ref, factor in (("live", 4 / 3), ("cache", 1.0)):
        out = tmp_path / f"dpo-{ref}"
        torchrun("train/dpo.py", ["--model_name_or_path", str(tmp_path / "sft"), "--preset", "tiny", "--output_dir", str(out),
                                  "--max_train_steps", "2", "--logging_steps", "1", "--max_seq_length", "128",
                                  "--reference_logprobs", ref, "--dataset_mixer_list", "tulu/synth-pref", "64"])
        for m in logged_perf(out):
            want = m["perf/tokens_per_s_per_device"] * flops * factor / (PEAK_TFLOPS * 1e12)
            assert m["perf/mfu"] == pytest.approx(want, rel=1e-9), ref


def test_rm_and_rlvr_log_mfu(tmp_path):
    out = tmp_path / "rm"
    torchrun("train/rm.py", ["--output_dir", str(out), "--max_train_steps", "2", "--logging_steps", "1",
                             "--max_token_length", "128", "--dataset_mixer_list", "tulu/synth-pref", "64"])
    config = AutoConfig.from_pretrained(out)  # a reward model: the lm_head is a 1-row score head
    with torch.device("meta"):
        from transformers import AutoModelForSequenceClassification
        n = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    flops = 6 * n + 12 * config.num_hidden_layers * config.hidden_size * 128
    for m in logged_perf(out):
        assert m["perf/mfu"] == pytest.approx(m["perf/tokens_per_s_per_device"] * flops / (PEAK_TFLOPS * 1e12), rel=1e-9)

    # RLVR logs no token count, so check the tokens the MFU implies: between one and L per response.
    out = tmp_path / "rlvr"
    torchrun("train/rlvr.py", ["--output_dir", str(out), "--algo", "grpo", "--async_mode", "False", "--total_episodes",
                               "64", "--local_rollout_batch_size", "8", "--number_samples_per_prompt", "4",
                               "--local_mini_batch_size", "32", "--per_device_train_batch_size", "8", "--num_evals", "0"])
    rows = [m for m in read_metrics(out) if "time/step" in m]
    assert rows and all("perf/mfu" in m for m in rows)
    for m in rows:
        per_token_flops = palm_flops(out, 1)  # policy trained once + policy and reference forwards (1/3 each)
        implied = m["perf/mfu"] * PEAK_TFLOPS * 1e12 * m["time/step"] / (per_token_flops * (1 + 2 / 3))
        assert 8 * 4 * 2 <= implied <= 8 * 4 * (256 + 24), implied
