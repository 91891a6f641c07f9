"""CI smoke for the throughput benchmarks: each runs in a tiny configuration and prints its markdown table.

Not a measurement: one or two steps at a short length, only checking that the benchmark code, the
scripts it launches and the table it prints still fit together. TRL columns are filled only when trl
is importable (the `bench` extra); without it the tables say "n/a". No GPU needed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, needs_shared_data, script_env

TINY = ["--steps", "1", "--warmup", "0", "--rounds", "1", "--max_seq_length", "64",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--examples", "8",
        "--median_tokens", "24"]


def run_bench(*args: str, timeout: int = 120, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env or script_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{args[0]} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_sft_throughput_prints_packed_and_padded(tmp_path):
    # Packages added through PYTHONPATH (the only way on a machine without a registry) must reach the
    # training processes the benchmark starts: a sitecustomize there records every interpreter it enters.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nopen(os.path.join(os.path.dirname(__file__), f'seen-{os.getpid()}'), 'w').write(' '.join(sys.argv))\n")
    env = script_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{os.pathsep}{tmp_path}"
    out = run_bench("benchmarks/sft_throughput.py", *TINY, env=env)
    assert any("train/sft.py" in f.read_text() for f in tmp_path.glob("seen-*")), "PYTHONPATH lost in the children"
    assert "| layout | tokens/s (non-pad, median) | padding fraction |" in out
    packed, padded = table_rows(out, "packed")[0], table_rows(out, "padded")[0]
    assert float(packed[1]) > 0 and float(padded[1]) > 0
    assert float(packed[2]) == 0.0  # padding-free rows carry no padding
    assert 0.0 <= float(padded[2]) < 1.0


def test_throughput_ours_vs_trl_table():
    out = run_bench("benchmarks/throughput.py", *TINY, "--layouts", "packed", "--no-dpo")
    assert "| layout | ours tok/s (chunked head) | ours tok/s (full logits) | TRL tok/s | ours / TRL |" in out
    row = table_rows(out, "packed")[0]
    assert float(row[1]) > 0 and float(row[2]) > 0  # both of our LM-head paths ran
    try:
        import trl  # noqa: F401
    except ImportError:
        assert "n/a (trl not installed)" in row[3]


def test_checkpoint_benchmark_round_trips_and_prints_its_table():
    # The benchmark itself stops with an error when a loaded checkpoint differs from what was saved.
    out = run_bench("benchmarks/checkpoint.py", "--sizes", "tiny", "--reps", "1")
    assert "| size | params (M) | ranks | ckpt GB | save s |" in out
    row = table_rows(out, "tiny")[0]
    assert row[1] == "0.9" and row[2] == "1" and float(row[4]) > 0


def test_lm_head_prints_both_stages_and_paths():
    out = run_bench("benchmarks/lm_head.py", "--tokens", "256", "--vocab", "4096", "--layers", "1", "--hidden", "64",
                    "--steps", "1", "--chunk", "64")
    rows = {r[0]: r for r in table_rows(out, "SFT") + table_rows(out, "DPO")}
    assert set(rows) == {"SFT", "DPO"} and all(len(r) == 7 for r in rows.values())


@pytest.mark.slow
@pytest.mark.realdata
@needs_shared_data()
def test_real_rlvr_prints_before_after_and_phase_rates(tmp_path):
    """benchmarks/real_rlvr.py end to end on the tiny model (TorchEngine, 2 steps of 2 x 2 responses of
    8 tokens): the GSM8K slices, the run, the before/after table, the phase rates and the plot."""
    out = run_bench("benchmarks/real_rlvr.py", "--out", str(tmp_path), "--model", "tulu/tiny", "--engine", "torch",
                    "--chat_template", "tulu", "--episodes", "8", "--prompts", "2", "--samples", "2",
                    "--response_length", "8", "--train_rows", "16", timeout=600)
    assert "| before (step 0) |" in out and "| after (step 2) |" in out, out[-2000:]
    rates = table_rows(out, "generation tok/s")
    assert rates, out[-2000:]
    values = out.split("| generation tok/s", 1)[1].splitlines()[2]  # the row under the header and rule
    assert all(float(v) > 0 for v in values.strip("| ").split(" | ")), values
    assert (tmp_path / "real_rlvr.png").stat().st_size > 0 and (tmp_path / "real_rlvr.md").exists()
    held_out = [json.loads(x) for x in (tmp_path / "gsm8k_heldout.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "gsm8k_train.jsonl").read_text().splitlines()]
    assert len(held_out) == 200 and len(train) == 16  # rows 0-199 held out, 200-215 trained on
    assert not {r["messages"][0]["content"] for r in held_out} & {r["messages"][0]["content"] for r in train}
