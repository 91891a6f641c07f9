"""Padding-free packing: many documents in one row, no token dropped, no attention across documents.

A packed row concatenates documents; position_ids restart at 0 for each, which is how attention
learns the boundaries (sdpa/eager build a block-diagonal causal mask from them when there is no
attention mask and no KV cache; flash-attn varlen takes cu_seqlens). The first label of each
document is ignored, so the shifted loss never predicts a document's first token from the previous
document: the packed loss equals the sum of the per-document losses exactly.
"""
from __future__ import annotations

import bisect

import torch

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack item indices into bins of at most `capacity` tokens: longest first, each into the fullest
    bin that still fits it (classic BFD; within 11/9·OPT + 1 bins). An item longer than capacity gets
    a bin of its own."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin id)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], b))
    return bins


def deal_bins(bins: list[list[int]], lengths: list[int], world: int) -> list[list[list[int]]]:
    """Give each rank the same number of bins (FSDP needs every rank to run the same number of
    forwards), heaviest bins first to the least-loaded rank. Missing bins are empty lists."""
    per_rank = -(-len(bins) // world) if bins else 1
    order = sorted(bins, key=lambda b: -sum(lengths[i] for i in b))
    order += [[]] * (per_rank * world - len(order))
    ranks: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for b in order:
        r = min((r for r in range(world) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(b)
        load[r] += sum(lengths[i] for i in b)
    return ranks


def pack(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One padding-free row from examples with `input_ids` and `labels` lists.

    Returns input_ids, labels, position_ids: (1, N); cu_seqlens: (docs+1,) int32; max_seqlen: int;
    doc_ids: (N,) document index of each token. An empty list gives a 1-token row that trains nothing
    (a rank with no data this micro-step still has to join the collectives).
    """
    if not examples:
        examples = [{"input_ids": [pad_id], "labels": [IGNORE_INDEX]}]
    ids, labels, pos, doc_ids, cu = [], [], [], [], [0]
    for d, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])
        pos += range(n)
        doc_ids += [d] * n
        cu.append(cu[-1] + n)
    return {
        "input_ids": torch.tensor([ids]),  # (1, N)
        "labels": torch.tensor([labels]),  # (1, N)
        "position_ids": torch.tensor([pos]),  # (1, N)
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),  # (docs+1,)
        "max_seqlen": max(cu[i + 1] - cu[i] for i in range(len(cu) - 1)),
        "doc_ids": torch.tensor(doc_ids),  # (N,)
    }


def pad(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch (the unpacked path): input_ids, labels, attention_mask: (B, L)."""
    if not examples:
        examples = [{"input_ids": [pad_id], "labels": [IGNORE_INDEX]}]
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)  # (B, L)
    labels = torch.full((len(examples), width), IGNORE_INDEX)  # (B, L)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, L)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[b, :n] = torch.tensor(ex["input_ids"])
        labels[b, :n] = torch.tensor(ex["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def model_inputs(model, batch: dict, device: torch.device) -> dict:
    """Keyword arguments for `model`'s HF forward. Packed rows pass position_ids (and cu_seqlens when
    the model was built with flash-attn, as its config says: the varlen kernel); padded rows pass the
    attention mask."""
    flash = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    kw = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}
    if flash:
        cu = batch["cu_seqlens"].to(device)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"])
    return kw
