"""The seven Tulu 3 seed commands as presets: each dry run plans at its original scale on this CPU,
and the per-rank memory it prints is the memory simulation's number for that shape and world size."""
import re
import subprocess
import sys

import pytest

from conftest import REPO, script_env
from tulu.memory import GiB, llama_config, simulate_model_state
from tulu.presets import PRESETS, expand

EXPECTED = {  # preset -> (world, model shape of the trained policy, offload)
    "tulu3_8b_sft": (64, "llama-3.1-8b", False), "tulu3_70b_sft": (64, "llama-3.1-70b", False),
    "tulu3_8b_dpo": (8, "llama-3.1-8b", False), "tulu3_70b_dpo": (64, "llama-3.1-70b", True),
    "tulu3_8b_rm": (8, "llama-3.1-8b", False), "tulu3_8b_rlvr": (7, "llama-3.1-8b", False),
    "tulu3_70b_rlvr": (40, "llama-3.1-70b", False),
}


def test_preset_flags_expand_and_later_flags_override():
    argv, preset = expand(["--preset", "tulu3_8b_sft", "--learning_rate", "1e-5"], "train/sft.py")
    assert preset is PRESETS["tulu3_8b_sft"] and argv[-3:-2] == ["1e-5"] and "--reduce_loss" in argv
    with pytest.raises(SystemExit, match="is for train/dpo.py"):
        expand(["--preset", "tulu3_8b_dpo"], "train/sft.py")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_dry_run_plans_at_real_scale(name):
    world, shape, offload = EXPECTED[name]
    script = PRESETS[name]["script"]
    proc = subprocess.run([sys.executable, str(REPO / script), "--preset", name, "--dry_run"], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"world size {world}" in out and "launch: torchrun" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("policy") or l.strip().startswith("reward model"))
    printed = float(re.search(r"per rank ([0-9.]+) GiB", line).group(1))
    kind = "reward" if "rm" in name else "causal_lm"
    plan = simulate_model_state(llama_config(shape), world, "bf16", offload, kind)
    assert abs(printed - plan.model_state_bytes / GiB) < 0.01, (printed, plan.model_state_bytes / GiB)
    if "rlvr" in name:
        assert "value" in out and "reference (frozen)" in out and "optimizer steps" in out
        assert "engine memory / GPU" in out and "KV cache" in out
    # the whole-job peak (tulu/activations.py, checked against measured peaks in test_activations.py):
    # every seed command fits an 80 GB GPU, as the original runs did on H100s
    peak = re.search(r"peak / rank +([0-9.]+) GiB \(at the (.+?)\): (fits|does NOT fit)", out)
    assert peak and peak.group(3) == "fits" and float(peak.group(1)) > (0 if offload else printed), out[-2000:]


@pytest.mark.slow
def test_dry_run_names_the_flag_that_makes_it_fit():
    """8B SFT with 4 rows of 4,096 tokens per rank and no activation checkpointing needs ~109 GiB
    (saved activations ~26 GiB per row); with checkpointing it fits, and the plan says so."""
    proc = subprocess.run([sys.executable, str(REPO / "train/sft.py"), "--preset", "tulu3_8b_sft",
                           "--per_device_train_batch_size", "4", "--dry_run"], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does NOT fit an 80 GB GPU" in proc.stdout and "to fit                       --gradient_checkpointing (" \
        in proc.stdout, proc.stdout[-1500:]
