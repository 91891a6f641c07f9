"""Reward-model pieces: preference-pair tokenization and filtering, the score head's initialization,
pair batches (padded or packed) and reading a sequence's score at its last real token.

The score of a sequence is the scalar head applied to the final (post-norm) hidden state of its last
real token, which the tulu template makes the `eos` that closes the final assistant turn (open-instruct
model_utils.py:189 `get_reward` @e363290).
Hugging Face's `*ForSequenceClassification.forward` pools at the rightmost token
that differs from `pad_token_id`: right for one right-padded sequence per row, wrong for a packed
row (every document but the last) and fragile whenever the pad id occurs in text. So we keep the
head's output at every position (`token_scores`) and pick the positions ourselves (`score_index`).
"""
from __future__ import annotations

import math

import datasets
import numpy as np
import torch

from tulu.chat import DataError, check_messages, encode, render
from tulu.data import TokenizedData, build_dataset
from tulu.dist import all_reduce
from tulu.fsdp import no_grad_forward
from tulu.losses import bradley_terry_loss
from tulu.packing import model_inputs, pack, pad

# ------------------------------------------------------------------------------ data


def tokenize_rm_pair(tokenizer, chosen: list[dict], rejected: list[dict]) -> dict[str, list[int]]:
    """Token ids of the prompt (chosen[:-1] + the assistant header), the chosen and the rejected
    conversation, as open-instruct PreferenceDatasetProcessor.tokenize (no BOS, no truncation)."""
    return {
        "prompt_input_ids": encode(tokenizer, render(tokenizer, chosen[:-1], add_generation_prompt=True)),
        "chosen_input_ids": encode(tokenizer, render(tokenizer, chosen)),
        "rejected_input_ids": encode(tokenizer, render(tokenizer, rejected)),
    }


def keep_pair(n_prompt: int, n_chosen: int, n_rejected: int, max_token_length: int | None,
              max_prompt_token_length: int | None) -> bool:
    """The filter the original meant (its nested conditional only ever checked the prompt,
    dataset_processor.py:322-336 @e363290): the prompt fits max_prompt_token_length and both
    conversations max_token_length."""
    if max_prompt_token_length is not None and n_prompt > max_prompt_token_length:
        return False
    return max_token_length is None or max(n_chosen, n_rejected) <= max_token_length


def _pref_row(tokenizer, max_token_length, max_prompt_token_length, skip_bad_rows):
    empty = {"chosen_input_ids": [], "rejected_input_ids": []}

    def fn(row, where):
        try:
            for field in ("chosen", "rejected"):
                check_messages(row.get(field), where, field)
                if row[field][-1]["role"] != "assistant":
                    raise DataError(f"{where}: field '{field}' must end with an assistant message")
        except DataError:
            if not skip_bad_rows:
                raise
            return {**empty, "status": "bad"}
        ids = tokenize_rm_pair(tokenizer, row["chosen"], row["rejected"])
        if not keep_pair(*(len(ids[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")),
                         max_token_length, max_prompt_token_length):
            return {**empty, "status": "dropped"}
        return {"chosen_input_ids": ids["chosen_input_ids"], "rejected_input_ids": ids["rejected_input_ids"],
                "status": "ok"}
    return fn


def build_pref_data(mixer: dict, splits: list[str], tokenizer, max_token_length: int | None,
                    max_prompt_token_length: int | None, skip_bad_rows: bool = False, num_proc: int | None = None,
                    is_main: bool = True) -> TokenizedData:
    """Preference pairs with combine_dataset semantics (no shuffle at mix time;
    open-instruct utils.py:403 @e363290):
    each source read from its own split (one split given = all), first rows taken, concatenated in
    mixer order. `lengths` is the pair's token count, chosen + rejected (what a micro-batch holds)."""
    if len(splits) not in (1, len(mixer)):
        raise ValueError(f"{len(splits)} splits for {len(mixer)} datasets: give one split, or one per dataset")
    splits = splits * len(mixer) if len(splits) == 1 else splits
    row_fn = _pref_row(tokenizer, max_token_length, max_prompt_token_length, skip_bad_rows)
    parts = [build_dataset("pref", {name: amount}, tokenizer, row_fn,
                           [max_token_length, max_prompt_token_length, skip_bad_rows],
                           split=split, shuffle=False, num_proc=num_proc, is_main=is_main, allow_empty=True)
             for (name, amount), split in zip(mixer.items(), splits)]
    ds = datasets.concatenate_datasets([p.ds for p in parts]) if len(parts) > 1 else parts[0].ds
    if len(ds) == 0:
        raise DataError(f"{list(mixer)}: no preference pair is left after the length filter")
    lengths = np.asarray([len(c) + len(r) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])])
    return TokenizedData(ds, lengths, sum(p.dropped for p in parts), sum(p.skipped for p in parts))


# ------------------------------------------------------------------------------ model


def score_head_init(seed: int):
    """init_missing for `build_model`: the score head drawn from N(0, 1/(hidden+1)) as open-instruct's
    `layer_init(model.score, std=1/sqrt(hidden+1))` intended (under ZeRO-3 that call was a no-op, so
    the released RM really started from HF's N(0, 0.02); listed as a deviation). Seeded, so every
    rank returns the same full tensor."""
    def init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name != "score.weight":
            raise KeyError(f"checkpoint has no weight {name!r} (only the reward head may be missing)")
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[-1] + 1)
    return init


def token_scores(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The score head at every position, (B, T) fp32, from one call of the root module.

    HF pools the head's (B, T, 1) output to (B, 1) inside forward, so a hook on the head keeps the
    per-position tensor, and a second hook makes it the root's output. That second hook is what
    FSDP2 needs: it is prepended, so FSDP's own post-forward hook (which runs after it) attaches the
    pre-backward hook, the one that re-gathers the root's resharded parameters (head, final norm,
    embeddings) for backward, to the tensor the loss really uses. Reading the captured tensor without
    it, or calling `model.model` and `model.score` directly, fails in backward (measured: "setStorage
    ... storage of size 0" on score.weight) or skips the root's gather altogether.
    """
    captured: list[torch.Tensor] = []
    hooks = [model.score.register_forward_hook(lambda _module, _args, out: captured.append(out)),
             model.register_forward_hook(lambda _module, _args, _pooled: captured[-1], prepend=True)]
    try:
        scores = model(**inputs)  # (B, T, 1): the root's output, replaced by the hook
    finally:
        for hook in hooks:
            hook.remove()
    return scores.squeeze(-1).float()  # (B, T)


def last_token_index(batch: dict) -> torch.Tensor:
    """Flat index into the (B·T) positions of each sequence's last real token, in document order.

    Packed rows: each document ends at cu_seqlens[1:] − 1. Padded rows (left or right padding): the
    rightmost position whose attention mask is 1. Pad ids are never consulted.
    """
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"][1:].long() - 1  # (docs,)
    mask = batch["attention_mask"]  # (B, T)
    T = mask.shape[1]
    last = (torch.arange(T) * mask).argmax(-1)  # (B,)
    return torch.arange(mask.shape[0]) * T + last  # (B,)


def last_token_scores(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """One score per sequence (docs,), read at its last real token."""
    scores = token_scores(model, score_inputs(model, batch, device))  # (B, T)
    return scores.flatten()[last_token_index(batch).to(device)]  # (docs,)


def score_inputs(model: torch.nn.Module, batch: dict, device: torch.device) -> dict:
    """Forward kwargs. Padded rows also get position_ids counted over real tokens, so a left-padded
    sequence sees the same positions (and the same rotary angles) as when it stands alone."""
    kw = model_inputs(model, batch, device)
    if "attention_mask" in batch:
        kw["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0).to(device)  # (B, T)
    return kw


# ------------------------------------------------------------------------------ batches


def collate_rm_pairs(rows: list[dict], pad_id: int, packing: bool) -> dict:
    """A micro-batch of preference pairs: the chosen sequences then the rejected ones, so the scores
    split as scores[:n] (chosen) and scores[n:] (rejected). Packed: one padding-free row with
    cu_seqlens; padded: a right-padded (2n, L) batch as the original's collator. `pairs` = n. No
    rows gives a 1-token dummy row with pairs = 0 (a rank without data this micro-step still has to
    join FSDP's collectives: the caller backpropagates 0 · its score)."""
    docs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    docs = [{"input_ids": list(d), "labels": list(d)} for d in docs]
    return {**(pack if packing or not docs else pad)(docs, pad_id), "pairs": len(rows)}


# ------------------------------------------------------------------------------ eval


def evaluate_rm(model: torch.nn.Module, data: TokenizedData, pad_id: int, d, per_device: int,
                packing: bool) -> tuple[dict[str, float], torch.Tensor]:
    """Bradley–Terry metrics over every pair of `data` (means over pairs, not over batches) and the
    per-pair scores (N, 2) = (chosen, rejected), identical on every rank.

    Rank r scores pairs r, r+W, ...; every rank runs the same number of forwards (FSDP's gathers are
    collectives), padding with dummy rows. One all_reduce assembles the scores.
    """
    n = len(data)
    mine = list(range(d.rank, n, d.world))
    scores = torch.zeros(n, 2, device=d.device)  # (N, 2)
    with no_grad_forward(model):
        for k in range(-(-(-(-n // d.world)) // per_device)):  # ceil(ceil(N / W) / per_device), same on every rank
            idx = mine[k * per_device:(k + 1) * per_device]
            s = last_token_scores(model, collate_rm_pairs(data.rows(idx), pad_id, packing), d.device)  # (2n,)
            if idx:
                scores[idx] = torch.stack([s[:len(idx)], s[len(idx):]], dim=1)
    scores = all_reduce(scores)  # each pair was filled by exactly one rank
    _, m = bradley_terry_loss(scores[:, 0], scores[:, 1])  # sums over the N pairs
    return {k: v.item() / n for k, v in m.items()}, scores.cpu()
