"""Packing: packed rows give the per-document logits and losses of separate runs; nothing dropped."""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tulu.packing import IGNORE_INDEX, best_fit_decreasing, deal_bins, pack, pad
from tulu.tiny import tiny_dir


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m.eval()


def _docs(n, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        L = rng.randint(3, 40)
        ids = [rng.randrange(3, 300) for _ in range(L)]
        labels = [IGNORE_INDEX if rng.random() < 0.3 else t for t in ids]
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def test_packed_logits_and_losses_equal_separate_documents(model):
    docs = _docs(6)
    batch = pack(docs, pad_id=1)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]  # (N, V)
        for d, doc in enumerate(docs):
            alone = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0]  # (L, V)
            sel = batch["doc_ids"] == d
            assert torch.allclose(packed[sel], alone, atol=1e-5), (packed[sel] - alone).abs().max()
    # Loss: the packed shifted CE equals the sum of per-document shifted CE.
    lab = batch["labels"][0]
    packed_ce = F.cross_entropy(packed[:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        sep = sum(F.cross_entropy(model(input_ids=torch.tensor([d["input_ids"]])).logits[0, :-1],
                                  torch.tensor(d["labels"][1:]), ignore_index=IGNORE_INDEX, reduction="sum") for d in docs)
    assert abs(packed_ce.item() - sep.item()) < 1e-4 * max(1.0, sep.item())


def test_every_token_appears_once_and_positions_restart():
    docs = _docs(9, seed=1)
    b = pack(docs, pad_id=1)
    assert b["input_ids"][0].tolist() == [t for d in docs for t in d["input_ids"]]
    assert b["cu_seqlens"].tolist()[-1] == sum(len(d["input_ids"]) for d in docs)
    starts = b["cu_seqlens"][:-1].tolist()
    assert all(b["position_ids"][0, s] == 0 for s in starts)
    assert all(b["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert b["max_seqlen"] == max(len(d["input_ids"]) for d in docs)


def test_padded_batch_masks_padding():
    docs = _docs(3, seed=2)
    b = pad(docs, pad_id=1)
    for i, d in enumerate(docs):
        n = len(d["input_ids"])
        assert b["attention_mask"][i].sum() == n and (b["labels"][i, n:] == IGNORE_INDEX).all()


def test_best_fit_decreasing_respects_capacity_and_keeps_every_item():
    rng = random.Random(3)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    bins = best_fit_decreasing(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 256) * 11 // 9 + 2  # BFD bound: 11/9·OPT + a little


def test_deal_bins_gives_every_rank_the_same_number():
    lengths = [5, 9, 3, 7, 1]
    bins = [[0], [1, 2], [3], [4]]
    for world in (1, 2, 3):
        ranks = deal_bins(bins, lengths, world)
        assert len({len(r) for r in ranks}) == 1
        assert sorted(i for r in ranks for b in r for i in b) == [0, 1, 2, 3, 4]
