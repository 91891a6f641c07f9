"""The whole recipe, shortened (`python -m tulu.demo --fast`): SFT → DPO → RM → RLVR on 2 CPU ranks,
each stage loading the previous stage's export; every stage's metric moves the right way; the
table and the PNG plots are written."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, script_env


@pytest.mark.slow
def test_fast_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "tulu.demo", "--fast", "--output_dir", str(out)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    acc = s["heldout_accuracy"]
    assert acc["sft"] > acc["base"] + 0.1, acc  # the untrained tiny model knows nothing
    assert s["dpo_eval_rewards_accuracy"] > 0.8, s
    assert s["rm_eval_accuracy"] > 0.7, s  # from a random head (0.5); 40 fast steps measured 0.785
    before, after = s["rlvr_eval_correct_rate"]
    assert after > before, s
    for stage in ("sft", "dpo", "rm", "rlvr"):
        assert (out / f"{stage}.png").stat().st_size > 1000
    assert "| RLVR |" in proc.stdout
