"""Defaults that are safe for a real model: pointed at a hub-style model path, every script resolves the
original's defaults (open-instruct @e363290: finetune.py, dpo_tune_cache.py, reward_modeling.py and
ppo_vllm_thread_ray_gtrl.py, as the shared inventory's flag tables give them), or Tulu 3's value where
the flag's docstring says so. The embedded tiny model's tuned values apply only to the embedded default
and to `--preset tiny`, and the startup line says so."""
import importlib.util
import sys

import pytest

from conftest import REPO
from tulu.config import cli
from tulu.presets import TINY

HUB = ["--model_name_or_path", "meta-llama/Llama-3.1-8B"]
# flag -> the original script's default
ORIGINAL = {
    "sft": dict(learning_rate=2e-5, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_seq_length=None,
                num_train_epochs=2, warmup_ratio=0.03, weight_decay=0.0, lr_scheduler_type="linear", seed=42,
                chat_template_name="tulu", gradient_checkpointing=False, keep_last_n_checkpoints=3),
    "dpo": dict(learning_rate=2e-5, per_device_train_batch_size=8, gradient_accumulation_steps=1, max_seq_length=None,
                num_train_epochs=2, warmup_ratio=0.03, weight_decay=0.0, lr_scheduler_type="linear", seed=42,
                dpo_gamma_beta_ratio=0.3, dpo_label_smoothing=0.0, keep_last_n_checkpoints=3),
    "rm": dict(learning_rate=2e-5, per_device_train_batch_size=1, gradient_accumulation_steps=8,
               per_device_eval_batch_size=1, max_token_length=None, max_prompt_token_length=None, num_train_epochs=1,
               warmup_ratio=0.0, eps=1e-5, weight_decay=0.01, lr_scheduler_type="linear", seed=1),
    "rlvr": dict(learning_rate=2e-5, total_episodes=100000, local_rollout_batch_size=64, local_mini_batch_size=64,
                 local_rollout_forward_batch_size=64, per_device_train_batch_size=1, num_epochs=4, response_length=53,
                 number_samples_per_prompt=1, beta=0.05, vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95,
                 whiten_rewards=False, warmup_ratio=0.0, num_evals=4, save_freq=-1, seed=1, max_token_length=None,
                 max_prompt_token_length=None, min_response_length=0, async_mode=True, vllm_num_engines=1,
                 vllm_tensor_parallel_size=1, weight_decay=0.01, lr_scheduler_type="linear"),
}
# Tulu 3's values, each stated in its flag's docstring (the recipe's choices, not a model's scale)
TULU3 = {
    "dpo": dict(dpo_loss_type="dpo_norm"),
    "rlvr": dict(temperature=1.0, stop_token="eos", apply_verifiable_reward=True, reward_model_multiplier=0.0,
                 non_stop_penalty=True, penalty_reward_value=-10.0, chat_template="tulu"),
}


def script_args(stage: str):
    spec = importlib.util.spec_from_file_location(f"train_{stage}", REPO / "train" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Args


def parse(stage: str, argv: list[str]):
    return cli(script_args(stage), argv, script=str(REPO / "train" / f"{stage}.py"))


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "rlvr"])
def test_a_real_model_gets_the_original_defaults(stage, capsys):
    args = parse(stage, HUB)
    want = ORIGINAL[stage] | TULU3.get(stage, {})
    got = {k: getattr(args, k) for k in want}
    assert got == want
    assert args.learning_rate == 2e-5  # the original's default in all four scripts
    assert "tiny model's preset" not in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "rlvr"])
def test_the_tiny_preset_applies_to_the_embedded_model_only(stage, capsys):
    tiny = TINY[f"{stage}.py"]
    flags = {tiny[i][2:]: tiny[i + 1] for i in range(0, len(tiny), 2)}
    for argv in ([], ["--model_name_or_path", "tulu/tiny"], ["--model_name_or_path", "/some/tiny/export", "--preset",
                                                             "tiny"]):
        args = parse(stage, argv)
        for name, value in flags.items():
            assert getattr(args, name) == type(getattr(args, name))(value), (argv, name)
        out = capsys.readouterr().out
        assert "tiny model's preset" in out and "--learning_rate" in out, argv
        assert flags["learning_rate"] != "2e-5"  # the preset really differs from the original's default
    # A flag given on the command line overrides the preset; a real model's path turns it off.
    assert parse(stage, ["--learning_rate", "7e-5"]).learning_rate == 7e-5
    assert parse(stage, ["--model_name_or_path", "/some/export"]).learning_rate == 2e-5
