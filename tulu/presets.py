"""The seven Tulu 3 seed commands as presets: `train/sft.py --preset tulu3_8b_sft` etc.

Each preset is the flag list of the published command (open-instruct docs/tulu3.md @e363290),
translated one to one, plus the original's defaults that our defaults do not
share (they are listed so the run is the original's, not ours). Flags given after `--preset`
override it. `launch` is the torchrun topology of the original run.

Dropped flags, and why: `--use_lora False` and `--deepspeed_stage 3` describe what we always do
(full fine-tuning, ZeRO-3-style sharding); `--actor_num_gpus_per_node` is torchrun's
`--nproc_per_node`; `--push_to_hub`, beaker and hf_* flags are Ai2 infrastructure.
"""
from __future__ import annotations

import os

RLVR_DATA = "allenai/RLVR-GSM-MATH-IF-Mixed-Constraints"

_SFT_COMMON = ["--use_flash_attn", "--use_slow_tokenizer", "--max_seq_length", "4096",
               "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
               "--lr_scheduler_type", "linear", "--warmup_ratio", "0.03", "--weight_decay", "0.0",
               "--num_train_epochs", "2", "--with_tracking", "--report_to", "wandb", "--logging_steps", "1",
               "--reduce_loss", "sum", "--dataset_mixer_list", "allenai/tulu-3-sft-mixture", "1.0",
               "--preprocessing_num_workers", "128", "--clip_grad_norm", "1.0"]
_DPO_COMMON = ["--use_flash_attn", "--gradient_checkpointing", "--max_seq_length", "2048",
               "--per_device_train_batch_size", "1", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.1",
               "--weight_decay", "0.0", "--num_train_epochs", "1", "--logging_steps", "1",
               "--dpo_loss_type", "dpo_norm", "--dpo_beta", "5", "--with_tracking", "--report_to", "wandb",
               "--clip_grad_norm", "1.0"]
_RLVR_COMMON = ["--dataset_mixer", f'{{"{RLVR_DATA}": 1.0}}', "--dataset_train_splits", "train",
                "--dataset_eval_mixer", f'{{"{RLVR_DATA}": 128}}', "--dataset_eval_splits", "train",
                "--max_token_length", "2048", "--max_prompt_token_length", "2048", "--response_length", "2048",
                "--reward_model_path", "allenai/Llama-3.1-Tulu-3-8B-RM", "--non_stop_penalty", "--stop_token", "eos",
                "--temperature", "1.0", "--ground_truths_key", "ground_truth", "--chat_template", "tulu",
                "--sft_messages_key", "messages", "--penalty_reward_value", "-10.0", "--apply_verifiable_reward", "true",
                "--reward_model_multiplier", "0.0", "--num_evals", "3", "--gradient_checkpointing", "--with_tracking",
                # the original's values, stated so the run does not rest on our defaults
                "--num_epochs", "4", "--number_samples_per_prompt", "1", "--eval_temperature", "1.0"]

PRESETS: dict[str, dict] = {
    "tulu3_8b_sft": dict(script="train/sft.py", launch=(8, 8), flags=[
        "--model_name_or_path", "meta-llama/Llama-3.1-8B", "--tokenizer_name", "meta-llama/Llama-3.1-8B",
        *_SFT_COMMON, "--learning_rate", "5e-06", "--output_dir", "output/sft_8b", "--dataset_mix_dir", "output/sft_8b",
        "--checkpointing_steps", "epoch", "--seed", "123", "--exp_name", "tulu-3-8b-sft"]),
    "tulu3_70b_sft": dict(script="train/sft.py", launch=(8, 8), flags=[
        "--model_name_or_path", "meta-llama/Llama-3.1-70B", "--tokenizer_name", "meta-llama/Llama-3.1-70B",
        *_SFT_COMMON, "--learning_rate", "2e-06", "--gradient_checkpointing", "--output_dir", "output/sft_70B",
        "--dataset_mix_dir", "output/sft_70B", "--checkpointing_steps", "1000", "--keep_last_n_checkpoints", "20",
        "--seed", "456", "--exp_name", "tulu-3-70b-sft"]),
    "tulu3_8b_dpo": dict(script="train/dpo.py", launch=(1, 8), flags=[
        "--model_name_or_path", "allenai/Llama-3.1-Tulu-3-8B-SFT", "--tokenizer_name", "allenai/Llama-3.1-Tulu-3-8B-SFT",
        *_DPO_COMMON, "--gradient_accumulation_steps", "16", "--learning_rate", "5e-07",
        "--dataset_mixer_list", "allenai/llama-3.1-tulu-3-8b-preference-mixture", "1.0", "--reference_logprobs", "live",
        "--output_dir", "output/dpo_8b", "--checkpointing_steps", "1000", "--seed", "42", "--exp_name", "tulu-3-8b-dpo"]),
    "tulu3_70b_dpo": dict(script="train/dpo.py", launch=(8, 8), flags=[
        "--model_name_or_path", "allenai/Llama-3.1-Tulu-3-70B-SFT", "--tokenizer_name", "allenai/Llama-3.1-Tulu-3-70B-SFT",
        *_DPO_COMMON, "--gradient_accumulation_steps", "2", "--learning_rate", "2e-07",
        "--dataset_mixer_list", "allenai/llama-3.1-tulu-3-70b-preference-mixture", "1.0", "--reference_logprobs", "cache",
        "--cpu_offload", "--output_dir", "output/dpo_70b", "--checkpointing_steps", "epoch", "--seed", "42",
        "--exp_name", "tulu-3-70b-dpo"]),
    "tulu3_8b_rm": dict(script="train/rm.py", launch=(1, 8), flags=[
        "--model_name_or_path", "allenai/Llama-3.1-Tulu-3-8B-SFT",
        "--dataset_mixer", '{"allenai/llama-3.1-tulu-3-8b-preference-mixture": 1.0}', "--dataset_train_splits", "train",
        "--dataset_eval_mixer", '{"allenai/ultrafeedback_binarized_cleaned": 1.0}', "--dataset_eval_splits", "test_prefs",
        "--max_token_length", "2048", "--max_prompt_token_length", "2048", "--num_train_epochs", "1",
        "--learning_rate", "3e-06", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.0",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "32", "--chat_template", "tulu",
        "--gradient_checkpointing", "--with_tracking", "--output_dir", "output/rm_8b", "--seed", "1"]),
    "tulu3_8b_rlvr": dict(script="train/rlvr.py", launch=(1, 7), flags=[
        *_RLVR_COMMON, "--model_name_or_path", "allenai/Llama-3.1-Tulu-3-8B-DPO", "--learning_rate", "3e-7",
        "--total_episodes", "10000000", "--per_device_train_batch_size", "2", "--local_rollout_forward_batch_size", "2",
        "--local_mini_batch_size", "32", "--local_rollout_batch_size", "32", "--beta", "0.05",
        "--vllm_tensor_parallel_size", "1", "--save_freq", "100", "--seed", "3", "--output_dir", "output/rlvr_8b"]),
    "tulu3_70b_rlvr": dict(script="train/rlvr.py", launch=(5, 8), flags=[
        *_RLVR_COMMON, "--model_name_or_path", "allenai/Llama-3.1-Tulu-3-70B-DPO", "--learning_rate", "1e-7",
        "--warmup_ratio", "0.1", "--total_episodes", "400000", "--per_device_train_batch_size", "1",
        "--local_rollout_forward_batch_size", "1", "--local_mini_batch_size", "16", "--local_rollout_batch_size", "16",
        "--beta", "0.07", "--vllm_tensor_parallel_size", "4", "--save_freq", "40", "--seed", "8",
        "--output_dir", "output/rlvr_70b"]),
}


# The embedded tiny model's tuned values. Every script's own defaults are the original's, which are safe
# for a real model (an SFT learning rate of 3e-3 destroys a pretrained one in a step). These apply only
# to the embedded default: when no --model_name_or_path is given (or it is tulu/tiny), or with
# `--preset tiny` (the demo and the tests, whose later stages start from a tiny model's export).
TINY_MODEL = "tulu/tiny"
TINY: dict[str, list[str]] = {
    "sft.py": ["--learning_rate", "3e-3", "--per_device_train_batch_size", "16", "--max_seq_length", "256"],
    "dpo.py": ["--learning_rate", "2e-4", "--per_device_train_batch_size", "16", "--max_seq_length", "256",
               "--warmup_ratio", "0.1", "--num_train_epochs", "1"],
    "rm.py": ["--learning_rate", "1e-3", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps",
              "1", "--per_device_eval_batch_size", "16", "--max_token_length", "256",
              "--max_prompt_token_length", "128"],
    "rlvr.py": ["--learning_rate", "3e-4", "--response_length", "24", "--max_token_length", "512",
                "--max_prompt_token_length", "256", "--total_episodes", "12800",
                "--per_device_train_batch_size", "16", "--local_rollout_forward_batch_size", "32",
                "--num_epochs", "1"],
}


def _model_flag(argv: list[str]) -> str | None:
    """The last --model_name_or_path value in argv (either spelling), or None."""
    value = None
    for i, tok in enumerate(argv):
        if tok == "--model_name_or_path" and i + 1 < len(argv):
            value = argv[i + 1]
        elif tok.startswith("--model_name_or_path="):
            value = tok.split("=", 1)[1]
    return value


def expand_tiny(argv: list[str], script: str) -> tuple[list[str], str | None]:
    """Prepend the tiny preset when it applies (flags given still override it); returns the new argv
    and the startup line that says so, or (argv, None)."""
    stage = os.path.basename(script)
    if stage not in TINY:
        return argv, None
    i = argv.index("--preset") if "--preset" in argv else -1
    asked = 0 <= i < len(argv) - 1 and argv[i + 1] == "tiny"
    if asked:
        argv = argv[:i] + argv[i + 2:]
    elif i >= 0 or _model_flag(argv) not in (None, TINY_MODEL):
        return argv, None
    why = "--preset tiny" if asked else f"the embedded default model ({TINY_MODEL})"
    return TINY[stage] + argv, (f"[tulu] {why}: the tiny model's preset {' '.join(TINY[stage])} (flags given "
                                f"override it; with a real --model_name_or_path every default is the original's)")


def expand(argv: list[str], script: str) -> tuple[list[str], dict | None]:
    """Replace `--preset NAME` in argv by the preset's flags (later flags still override)."""
    if "--preset" not in argv:
        return argv, None
    i = argv.index("--preset")
    if i + 1 >= len(argv) or argv[i + 1] not in PRESETS:
        raise SystemExit(f"--preset needs one of: tiny, {', '.join(PRESETS)}")
    preset = PRESETS[argv[i + 1]]
    if script.endswith(".py") and not script.endswith(preset["script"].split("/")[-1]):
        raise SystemExit(f"preset {argv[i + 1]} is for {preset['script']}, not {script}")
    return preset["flags"] + argv[:i] + argv[i + 2:] + ["--preset", argv[i + 1]], preset


def launch_line(name: str) -> str:
    nodes, per_node = PRESETS[name]["launch"]
    rdzv = " --rdzv_backend c10d --rdzv_endpoint $HEAD:29400" if nodes > 1 else ""
    return f"torchrun --nnodes {nodes} --nproc_per_node {per_node}{rdzv} {PRESETS[name]['script']} --preset {name}"
