"""train/dpo.py and tulu/preference.py: final-turn masking and dropped-pair counting, one-forward pair
log-probs (padded and packed) against separate forwards, 2-rank FSDP runs against an independent
single-process loop (tests/dpo_reference.py), cache vs live reference, simpo without any reference,
and the embedded default learning to prefer correct answers on held-out pairs."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_metrics, torchrun
from dpo_reference import reference_run, sequence_logp
from tulu.model import load_tokenizer
from tulu.preference import build_preference_data, collate_dpo_pairs, pair_logps, tokenize_final_turn, tokenize_dpo_pair
from tulu.synth import make_rows
from tulu.tiny import tiny_dir

MIXER = ["tulu/synth-pref", "160"]
REF_MIXER = {"tulu/synth-pref": 160}
STEPS, LR, SEQ, BETA = 5, 1e-3, 128, 5.0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tulu/tiny")


def test_only_the_final_assistant_turn_is_trained(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": "3."}, {"role": "user", "content": "And 2 + 2?"},
            {"role": "assistant", "content": "The answer is 4."}]
    out = tokenize_final_turn(tok, msgs, None)
    trained = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != -100]
    assert tok.decode(trained) == "The answer is 4." + tok.eos_token
    first = out["labels"].index(trained[0])  # trained tokens are one contiguous tail
    assert all(lab == -100 for lab in out["labels"][:first]) and out["labels"][first:] == out["input_ids"][first:]


def test_pairs_losing_all_trainable_tokens_are_dropped_and_counted(tok, tmp_path):
    rows = make_rows("tulu/synth-pref", 6)
    long_prompt = [{"role": "system", "content": "Think step by step. " * 30}]
    rows[1]["rejected"] = long_prompt + rows[1]["rejected"]  # only the rejected side runs out of room
    rows[4]["chosen"] = long_prompt + rows[4]["chosen"]  # only the chosen side
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tokenize_dpo_pair(tok, rows[1]["chosen"], rows[1]["rejected"], 64) is None
    data = build_preference_data({str(path): 6}, tok, max_seq_length=64)
    assert (len(data), data.dropped) == (4, 2)
    assert all(data.lengths[i] == len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
               for i, r in enumerate(data.rows(range(len(data)))))
    assert len(build_preference_data({str(path): 6}, tok, max_seq_length=None)) == 6


@pytest.mark.parametrize("packed", [False, True])
def test_one_forward_pair_logps_equal_separate_forwards(tok, packed):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    rows = []
    for r in make_rows("tulu/synth-pref", 5):  # prompts of different lengths: real padding / packing
        rows.append(tokenize_dpo_pair(tok, r["chosen"], r["rejected"], None))
    with torch.no_grad():
        got = pair_logps(model, collate_dpo_pairs(rows, tok.pad_token_id, packed), torch.device("cpu"))
        for side in ("chosen", "rejected"):
            want = [sequence_logp(model, r[f"{side}_input_ids"], r[f"{side}_labels"]) for r in rows]
            # Relative for the sums (~-110 here: one fp32 ulp is 7.6e-6), absolute for the averages.
            total, mean = torch.stack([w[0] for w in want]), torch.stack([w[1] for w in want])
            assert ((got[side] - total).abs() / total.abs().clamp(min=1)).max() <= 1e-5, side
            assert (got[f"{side}_avg"] - mean).abs().max() <= 1e-5, side
    assert rows[0]["chosen_input_ids"] != rows[0]["rejected_input_ids"]


# ------------------------------------------------------------------------------ torchrun launches


def _run(out, *extra, nproc=2):
    return torchrun("train/dpo.py", ["--dataset_mixer_list", *MIXER, "--max_train_steps", str(STEPS),
                                     "--learning_rate", str(LR), "--warmup_ratio", "0", "--max_seq_length", str(SEQ),
                                     "--dpo_beta", str(BETA), "--output_dir", str(out), "--mixed_precision", "fp32",
                                     *extra], nproc=nproc)


def _assert_matches(logged, ref, what):
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1)), what
    for m, (loss, gn) in zip(logged, ref):
        assert abs(m["train/loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), (what, m["step"], m["train/loss"], loss)
        assert abs(m["train/grad_norm"] - gn) <= 1e-5 * max(1.0, gn), (what, m["step"], m["train/grad_norm"], gn)


@pytest.mark.slow
def test_cache_and_live_match_each_other_and_the_single_process_loop(tmp_path):
    """dpo_norm, padded, 2 ranks x 2 pairs x GA 2: cache run (chunked LM head), live run (full logits),
    independent loop; then the cache is reused by a packed wpo run (one cache serves every loss type and
    layout)."""
    flags = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    cache = _run(tmp_path / "cache", *flags, "--packing", "False", "--reference_logprobs", "cache")
    assert "wrote reference log-prob cache for 160 pairs" in cache.stdout
    assert (tmp_path / "cache" / "reference_logprobs" / "train" / "COMPLETE").exists()
    # the live run takes the full-logits path; every other run here, the chunked LM head (the default)
    _run(tmp_path / "live", *flags, "--packing", "False", "--reference_logprobs", "live", "--chunked_lm_head", "False")
    got_cache, got_live = read_metrics(tmp_path / "cache"), read_metrics(tmp_path / "live")
    for a, b in zip(got_cache, got_live):
        for k in ("train/loss", "train/grad_norm", "train/rewards/margin", "train/logps/chosen"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (k, a["step"], a[k], b[k])
    ref = reference_run(REF_MIXER, "dpo_norm", 2, 2, 2, STEPS, LR, SEQ, BETA)
    _assert_matches(got_cache, ref, "cache")
    _assert_matches(got_live, ref, "live")
    # step 1: policy == reference, so every implicit reward is 0 up to float noise (the cache is computed
    # by a separate pass, so exact ties, and with them rewards/accuracy, are not guaranteed to be 0)
    assert abs(got_cache[0]["train/rewards/margin"]) < 1e-4 and got_cache[-1]["train/rewards/margin"] > 0

    (tmp_path / "cache" / "metrics.jsonl").unlink()
    wpo = _run(tmp_path / "cache", "--per_device_train_batch_size", "4", "--packing", "True",
               "--reference_logprobs", "cache", "--dpo_loss_type", "wpo")
    assert "reusing reference log-prob cache" in wpo.stdout
    logged = read_metrics(tmp_path / "cache")
    _assert_matches(logged, reference_run(REF_MIXER, "wpo", 4, 1, 2, STEPS, LR, SEQ, BETA), "wpo packed")
    assert all(m["perf/padding_fraction"] < 0.05 for m in logged)


@pytest.mark.slow
def test_simpo_builds_no_reference_and_matches_the_single_process_loop(tmp_path):
    proc = _run(tmp_path / "simpo", "--per_device_train_batch_size", "4", "--dpo_loss_type", "simpo",
                "--reference_logprobs", "live")
    assert "reference-free: no reference model, no reference cache" in proc.stdout
    assert not (tmp_path / "simpo" / "reference_logprobs").exists()
    ref = reference_run(REF_MIXER, "simpo", 4, 1, 2, STEPS, LR, SEQ, BETA)
    _assert_matches(read_metrics(tmp_path / "simpo"), ref, "simpo")


@pytest.mark.slow
def test_default_run_prefers_correct_answers_on_heldout_pairs(sft_tiny, tmp_path):
    """The embedded default (tulu/synth-pref, held-out tulu/synth-pref-eval in an unseen phrasing),
    default settings, stopped at 40 of its 125 steps to keep CI short (a full default run: 0.995).
    Evaluations every 15 steps log their own lines and never cut a 10-step training window short."""
    out = tmp_path / "dpo"
    proc = torchrun("train/dpo.py", ["--model_name_or_path", str(sft_tiny), "--preset", "tiny", "--output_dir", str(out),
                                     "--logging_steps", "10", "--eval_steps", "15", "--max_train_steps", "40"],
                    timeout=600)
    assert "loss dpo_norm beta 5.0" in proc.stdout  # Tulu 3's β is the default for dpo_norm
    result = json.loads((out / "eval_results.json").read_text())
    assert result["eval/rewards/accuracy"] > 0.9, result
    logged = read_metrics(out)
    assert [m["step"] for m in logged if "train/loss" in m] == [10, 20, 30, 40]
    assert [m["step"] for m in logged if "eval/loss" in m] == [15, 30, 40]
    assert not any("train/loss" in m and "eval/loss" in m for m in logged)
    assert logged[-1]["eval/rewards/accuracy"] == result["eval/rewards/accuracy"]
    assert logged[-2]["train/rewards/accuracy"] > 0.8 and logged[-2]["train/loss"] < 0.6
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


@pytest.mark.slow
def test_moe_load_balancing_loss_is_the_original_weight_times_the_micro_batch_mean(tok, tmp_path):
    """A tiny Qwen3-MoE, 2 ranks x 2 micro-batches of one pair ([chosen; rejected], padded): the logged
    train/aux_loss of the first step equals 0.001 (the original DPO default) times the mean, over the
    step's four micro-batches, of the Switch Transformer loss written out by hand over each micro-batch's
    real tokens (sft_reference.switch_loss)."""
    from families import write_family
    from sft_reference import switch_loss
    from tulu.data import epoch_permutation, step_samples

    model_dir = write_family("qwen3_moe", tmp_path / "qwen3_moe")
    out = tmp_path / "moe"
    torchrun("train/dpo.py", ["--dataset_mixer_list", *MIXER, "--model_name_or_path", str(model_dir),
                              "--max_train_steps", "1", "--max_seq_length", str(SEQ), "--per_device_train_batch_size",
                              "1", "--gradient_accumulation_steps", "2", "--packing", "False", "--load_balancing_loss",
                              "--output_dir", str(out), "--mixed_precision", "fp32"])
    logged = read_metrics(out)[0]
    data = build_preference_data(REF_MIXER, tok, SEQ)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = []
    for i in step_samples(epoch_permutation(len(data), 42, 0), 0, 4):
        batch = collate_dpo_pairs(data.rows([i]), tok.pad_token_id, packed=False)  # (2, L)
        with torch.no_grad():
            fwd = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_router_logits=True, use_cache=False)
        losses.append(switch_loss(fwd.router_logits, model.config.num_experts_per_tok,
                                  batch["attention_mask"].flatten()))
    hand = 0.001 * torch.stack(losses).mean().item()
    assert abs(logged["train/aux_loss"] - hand) < 1e-6 * max(1.0, hand), (logged["train/aux_loss"], hand)
