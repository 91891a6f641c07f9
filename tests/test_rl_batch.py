"""tulu/rl_batch.py: RLVR prompt data is checked when it loads, and the learner's log-prob forward on a
left-padded rollout batch equals each sequence's own unpadded forward (also when the pad id lies outside
the embedding, as with a tokenizer whose `<pad>` was added after the model was trained)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tulu.chat import DataError
from tulu.model import load_tokenizer
from tulu.rl_batch import build_prompt_data, response_logprobs, rollout_batch
from tulu.tiny import tiny_dir


def _row(i, dataset="gsm8k", truth="#### 4"):
    return {"messages": [{"role": "user", "content": f"what is {i} + {4 - i}?"}], "ground_truth": truth,
            "dataset": dataset}


@pytest.mark.parametrize("bad, error", [
    ({"dataset": "gsm8kk"}, r"row 1 \(id .*\): field 'dataset' / 'ground_truth': no verifier for source 'gsm8kk'"),
    ({"truth": "four"}, r"row 1 \(id .*\): field 'dataset' / 'ground_truth': gsm8k ground truth has no single"),
    ({"dataset": "ifeval", "truth": "not json"}, r"row 1 .*ifeval ground truth is not JSON"),
])
def test_unknown_sources_and_malformed_ground_truths_fail_at_load_or_are_skipped(tmp_path, monkeypatch, bad, error):
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tulu/tiny")
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [_row(0), _row(1, **bad), _row(2)]))
    with pytest.raises(DataError, match=error):
        build_prompt_data({str(path): 1.0}, tok, "train", None, None)
    data = build_prompt_data({str(path): 1.0}, tok, "train", None, None, skip_bad_rows=True)
    assert len(data) == 2 and data.skipped == 1
    assert data.ds["ground_truth"] == ["#### 4", "#### 4"]


@pytest.mark.parametrize("pad_outside_vocab", [False, True])
def test_response_logprobs_of_a_padded_batch_equal_each_sequence_alone(pad_outside_vocab):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32, attn_implementation="sdpa").eval()
    V = model.config.vocab_size
    pad_id = V if pad_outside_vocab else 0  # V: one past the embedding's last row
    queries = [torch.randint(1, V, (n,)).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(1, V, (n,)).tolist() for n in (4, 7, 1)]
    R, temperature = 8, 0.7
    batch = rollout_batch(queries, responses, pad_id, R)
    with torch.no_grad():
        got = response_logprobs(model, batch, slice(None), torch.device("cpu"), temperature)  # (3, R)
        for b, (q, r) in enumerate(zip(queries, responses)):
            logits = model(torch.tensor([q + r])).logits[0, len(q) - 1:-1].double() / (temperature + 1e-7)
            want = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)  # (len(r),)
            torch.testing.assert_close(got[b, :len(r)].double(), want, atol=2e-5, rtol=1e-5)
            assert (got[b, len(r):] == 1.0).all()  # INVALID_LOGPROB on padding: KL 0 there
