"""Fault injector for tests/test_failures.py: run a training script's real `main` under torchrun
with one of the names it imported made to raise on one rank, at one call.

    torchrun --nproc_per_node 2 tests/scripts/fail_on_rank.py train.sft sft_loss 1 3 -- --output_dir out
raises `ValueError("injected failure on rank 1")` from the 3rd call of `sft_loss` on rank 1.
"""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

module_name, function, rank, call = sys.argv[1:5]
assert sys.argv[5] == "--", "usage: MODULE FUNCTION RANK CALL -- SCRIPT ARGS"
script = importlib.import_module(module_name)
original, calls = getattr(script, function), [0]


def failing(*args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == rank and calls[0] == int(call):
        raise ValueError(f"injected failure on rank {rank}")
    return original(*args, **kwargs)


setattr(script, function, failing)
script.main(script.cli(script.Args, sys.argv[6:], script=script.__file__))  # its presets, not ours
script.shutdown()
