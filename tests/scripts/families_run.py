"""Every training stage for a few steps on each model family, in one torchrun launch (tests/test_families.py).

    torchrun --standalone --nproc_per_node 2 tests/scripts/families_run.py --models DIR --out DIR [--families a,b]

For each model folder DIR/<family> (tests/families.py writes them), runs the real `main` of
train/sft.py, then dpo.py, rm.py and rlvr.py (GRPO, with the engines' sync check every step) on the
SFT export, each for two optimizer steps with the tiny preset: out/<family>/<stage>. The scripts' mains
leave the process group up, so one launch serves them all (a launch costs ~7 s here); the first
failure ends the launch, and the line "[families] <stage> <family>" before it names the pair.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train import dpo, rlvr, rm, sft  # noqa: E402
from tulu.dist import print0, shutdown  # noqa: E402


def stage_flags(model: Path, out: Path) -> dict:
    """(module, argv) per stage; each later stage starts from the SFT export, as the recipe does."""
    common = ["--preset", "tiny", "--logging_steps", "1"]
    pairs = ["--dataset_mixer_list", "tulu/synth-pref", "32", "--per_device_train_batch_size", "4",
             "--gradient_accumulation_steps", "1", "--max_train_steps", "2"]
    return {
        "sft": (sft, [*common, "--model_name_or_path", str(model), "--max_train_steps", "2",
                      "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                      "--output_dir", str(out / "sft")]),
        "dpo": (dpo, [*common, *pairs, "--model_name_or_path", str(out / "sft"), "--output_dir", str(out / "dpo")]),
        "rm": (rm, [*common, *pairs, "--model_name_or_path", str(out / "sft"), "--output_dir", str(out / "rm")]),
        "rlvr": (rlvr, ["--preset", "tiny", "--model_name_or_path", str(out / "sft"), "--algo", "grpo",
                        "--number_samples_per_prompt", "2", "--local_rollout_batch_size", "4",
                        "--local_mini_batch_size", "8", "--per_device_train_batch_size", "4",
                        "--total_episodes", "32", "--num_evals", "0", "--response_length", "12",
                        "--async_mode", "false", "--sync_check_steps", "1", "--output_dir", str(out / "rlvr")]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--families", default=None, help="comma-separated (default: every folder under --models)")
    args = ap.parse_args()
    families = args.families.split(",") if args.families else sorted(p.name for p in args.models.iterdir())
    for family in families:
        for stage, (module, argv) in stage_flags(args.models / family, args.out / family).items():
            print0(f"[families] {stage} {family}")
            module.main(module.cli(module.Args, argv, script=module.__file__))
    print0(f"[families] done: {len(families)} families x 4 stages")
    shutdown()


if __name__ == "__main__":
    main()
