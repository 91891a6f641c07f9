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
    # RLVR (from the DPO model, as Tulu 3): the verified-correct rate of its own samples rises from the first
    # quarter of the run to the last (measured 0.076 -> 0.130 and 0.076 -> 0.133). The greedy held-out rate
    # is reported, not asserted: two runs that differed only in the summation order of the advantage
    # whitening ended at 0.135 and 0.215 from 0.165 (test_rlvr.py asserts held-out gains from the SFT model).
    rates = [m["objective/verifiable_correct_rate"] for m in map(json.loads, (out / "rlvr" / "metrics.jsonl").open())
             if "objective/verifiable_correct_rate" in m]
    quarter = len(rates) // 4
    first, last = sum(rates[:quarter]) / quarter, sum(rates[-quarter:]) / quarter
    assert last > first + 0.02, (first, last)
    assert len(s["rlvr_eval_correct_rate"]) == 2
    for stage in ("sft", "dpo", "rm", "rlvr"):
        assert (out / f"{stage}.png").stat().st_size > 1000
    assert "| RLVR |" in proc.stdout
