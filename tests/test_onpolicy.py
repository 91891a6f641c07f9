"""On-policy preference pairs (tulu/onpolicy.py): the SFT model's own samples, a right one chosen over
a wrong one. Checked against an independent reading of each answer (its last number against the ground
truth), and read back through DPO's own tokenization."""
import re

from tulu.mixer import write_rows
from tulu.onpolicy import build_pairs
from tulu.synth import make_rows


def last_number(text: str) -> float | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None


def test_pairs_choose_a_right_sample_over_a_wrong_one(sft_tiny, tmp_path):
    prompts, samples = 80, 4
    pairs, stats = build_pairs(str(sft_tiny), "tulu/synth-rlvr", prompts, samples, seed=3)
    rows = {r["id"]: r for r in make_rows("tulu/synth-rlvr", prompts, seed=3)}
    assert stats["prompts"] == prompts and stats["pairs"] == stats["prompts_with_a_pair"] == len(pairs)
    # the SFT model is right often but not always (measured ~0.3 at temperature 1), so pairs exist and
    # some prompts have none
    assert 0.05 < stats["sampled_correct_rate"] < 0.95, stats
    assert 5 <= len(pairs) < prompts, stats
    for p in pairs:
        row = rows[p["id"].rsplit("_pair", 1)[0]]
        assert p["chosen"][:-1] == p["rejected"][:-1] == row["messages"]  # one prompt, two answers
        good, bad = p["chosen"][-1]["content"], p["rejected"][-1]["content"]
        assert good != bad
        assert last_number(good) == float(row["ground_truth"]), (good, row["ground_truth"])
        assert last_number(bad) != float(row["ground_truth"]), (bad, row["ground_truth"])

    # the file is preference data DPO reads (its mixer and tokenization); each pair's two sides share
    # the prompt's tokens and differ after it
    from tulu.model import load_tokenizer
    from tulu.preference import build_preference_data

    path = write_rows(pairs, tmp_path / "pairs.jsonl")
    data = build_preference_data({str(path): 1.0}, load_tokenizer(str(sft_tiny)), 256, mix_dir=str(tmp_path / "mix"))
    assert len(data.ds) == len(pairs)
    for row in data.ds.select(range(3)):
        start = row["chosen_labels"].index(next(x for x in row["chosen_labels"] if x != -100))
        assert row["chosen_input_ids"][:start] == row["rejected_input_ids"][:start]
        assert row["chosen_input_ids"][start:] != row["rejected_input_ids"][start:]
