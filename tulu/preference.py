"""Preference pairs for the DPO family: tokenization, pair collation, per-sequence log-probs, and
the on-disk reference log-prob cache.

Tokenization (tulu template, right truncation at max_seq_length, no BOS): only the FINAL assistant
turn of `chosen` / `rejected` is trained (its content and eos); every earlier token, the
`<|assistant|>\\n` header included, is IGNORE_INDEX. Deviation: open-instruct @e363290
(`encode_dpo_example` = `encode_sft_example` per side) trained every assistant turn, shared
earlier turns included; those cancel in summed-logp DPO but not in dpo_norm's token averages
(dpo_tune.py:411; "mask all but the last turn" only arrived in 8699c789b). A pair where either
side has no trainable token left after truncation is dropped and counted.

Collation: the B pairs of a micro-batch go through the model in ONE forward, as rows
[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}], either right-padded (2B, L) or packed into one
padding-free row (1, N) whose per-sequence log-probs come from segment sums. Both give the 2B
sequence log-probs in that order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tulu.chat import IGNORE_INDEX, DataError, check_messages, encode, render
from tulu.data import TokenizedData, build_dataset
from tulu.dist import all_reduce, barrier, print0
from tulu.fsdp import no_grad_forward
from tulu.lm_head import head_logprobs, next_token_targets
from tulu.ops import logprobs_from_logits, sequence_logps
from tulu.packing import model_inputs, pack, pad

SIDES = ("chosen", "rejected")
LOGP_KEYS = ("chosen", "rejected", "chosen_avg", "rejected_avg")  # a cache row's columns, in order


def tokenize_final_turn(tokenizer, messages: list[dict], max_seq_length: int | None) -> dict | None:
    """input_ids and labels of one conversation with only its last (assistant) message trained.

    The prompt is the rendered prefix with the generation header, so the labels start exactly at the
    final assistant content (prefix-stable tokenization, as tulu.chat.tokenize_sft assumes).
    Returns None when truncation leaves no trainable token.
    """
    input_ids = encode(tokenizer, render(tokenizer, messages))
    if max_seq_length is not None:
        input_ids = input_ids[:max_seq_length]
    prompt_len = len(encode(tokenizer, render(tokenizer, messages[:-1], add_generation_prompt=True)))
    labels = [IGNORE_INDEX] * min(prompt_len, len(input_ids)) + input_ids[prompt_len:]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_dpo_pair(tokenizer, chosen: list[dict], rejected: list[dict], max_seq_length: int | None) -> dict | None:
    """{chosen,rejected}_{input_ids,labels}, or None when either side loses all trainable tokens."""
    out = {}
    for side, messages in zip(SIDES, (chosen, rejected)):
        tok = tokenize_final_turn(tokenizer, messages, max_seq_length)
        if tok is None:
            return None
        out[f"{side}_input_ids"], out[f"{side}_labels"] = tok["input_ids"], tok["labels"]
    return out


def _pref_row(tokenizer, max_seq_length, skip_bad_rows):
    empty = {f"{s}_{k}": [] for s in SIDES for k in ("input_ids", "labels")}

    def fn(row, where):
        try:
            for side in SIDES:
                if row.get(side) is None:
                    raise DataError(f"{where}: missing field {side!r} (preference data needs 'chosen' and 'rejected')")
                check_messages(row[side], where, side)
                if row[side][-1]["role"] != "assistant":
                    raise DataError(f"{where}: field '{side}' must end with an assistant message")
        except DataError:
            if not skip_bad_rows:
                raise
            return {**empty, "pair_length": 0, "status": "bad"}
        out = tokenize_dpo_pair(tokenizer, row["chosen"], row["rejected"], max_seq_length)
        if out is None:
            return {**empty, "pair_length": 0, "status": "dropped"}
        return {**out, "pair_length": len(out["chosen_input_ids"]) + len(out["rejected_input_ids"]), "status": "ok"}
    return fn


def build_preference_data(mixer: dict, tokenizer, max_seq_length: int | None, skip_bad_rows: bool = False,
                          mix_dir: str | None = None, num_proc: int | None = None, is_main: bool = True,
                          split: str = "train") -> TokenizedData:
    """Tokenized pairs (cached on disk like SFT data); `lengths` = chosen + rejected tokens of each pair."""
    data = build_dataset("pref", mixer, tokenizer, _pref_row(tokenizer, max_seq_length, skip_bad_rows),
                         [max_seq_length, skip_bad_rows, "final-turn"], split=split, mix_dir=mix_dir,
                         num_proc=num_proc, is_main=is_main)
    return dataclasses.replace(data, lengths=np.asarray(data.ds["pair_length"], dtype=np.int64))


# ------------------------------------------------------------------------------ collation + forward


def collate_dpo_pairs(rows: list[dict], pad_id: int, packed: bool) -> dict:
    """One forward's inputs for B pairs: sequences [chosen_0..B-1; rejected_0..B-1], padded to (2B, L)
    or packed into (1, N) with doc_ids. `pairs` = B (0 for an empty micro-batch: a 1-token dummy row)."""
    seqs = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for s in SIDES for r in rows]
    batch = pack(seqs, pad_id) if packed else pad(seqs, pad_id)
    batch["pairs"] = len(rows)
    return batch


def pair_logps(model, batch: dict, device: torch.device, chunked: bool = False) -> dict[str, torch.Tensor]:
    """Summed and token-averaged log-probs of every sequence of a collated pair batch, one forward.

    Returns {"chosen", "rejected", "chosen_avg", "rejected_avg"}: (B,) each, fp32. The log-softmax is
    taken in fp32 a few rows at a time (tulu.ops.logprobs_from_logits), never as a full fp32 (B, T, V);
    chunked: through the LM head a chunk of tokens at a time (tulu.lm_head), never building the logits.
    """
    inputs, labels = model_inputs(model, batch, device), batch["labels"][:, 1:].to(device)  # labels (R, T-1)
    if chunked:  # the last position predicts nothing
        token_logps = head_logprobs(model, inputs, next_token_targets(batch["labels"].to(device)))[0][:, :-1]
    else:
        token_logps = logprobs_from_logits(model(**inputs).logits[:, :-1], labels)  # (R, T-1) fp32
    mask = labels != IGNORE_INDEX  # (R, T-1)
    n = 2 * batch["pairs"]
    seg = {}
    if "doc_ids" in batch:  # packed: sequence of each predicted token (the shifted labels)
        seg = {"segment_ids": batch["doc_ids"][1:].to(device), "num_segments": n}
        token_logps, mask = token_logps[0], mask[0]  # (N-1,)
    total = sequence_logps(token_logps, mask, average=False, **seg)  # (2B,)
    mean = sequence_logps(token_logps, mask, average=True, **seg)  # (2B,)
    if n == 0:  # empty micro-batch: zeros still connected to the graph, so FSDP's backward hooks run
        zero = (token_logps.sum() * 0.0).reshape(1)  # (1,)
        return {k: zero for k in LOGP_KEYS}
    b = batch["pairs"]
    return {"chosen": total[:b], "rejected": total[b:], "chosen_avg": mean[:b], "rejected_avg": mean[b:]}


def shard_batches(n: int, rank: int, world: int, per_device: int) -> list[list[int]]:
    """Inference layout over examples 0..n-1: chunks of per_device dealt round-robin to ranks, then
    padded with empty chunks so every rank runs the same number of forwards (FSDP collectives)."""
    chunks = [list(range(i, min(i + per_device, n))) for i in range(0, n, per_device)]
    per_rank = max(1, -(-len(chunks) // world))
    mine = chunks[rank::world]
    return mine + [[]] * (per_rank - len(mine))


# ------------------------------------------------------------------------------ reference cache


def data_identity(data: TokenizedData) -> str:
    """Content hash of the tokenized pairs (their Arrow buffers): same tokens in the same order."""
    h = hashlib.sha256(str(len(data)).encode())
    for col in (f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels")):
        for chunk in data.ds.data.column(col).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.hexdigest()[:20]


def model_identity(path: str | Path) -> list:
    """Model folder and its weight files' (name, size, mtime): rewriting the weights invalidates the cache."""
    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors*"))
    return [str(path.resolve())] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


@dataclasses.dataclass(frozen=True)
class PairLayout:
    """How pairs go through a model outside the training step (the reference cache, evaluation):
    `per_device` pairs per forward on each rank, packed or padded, through the chunked LM head or not."""
    per_device: int
    packed: bool
    pad_id: int
    chunked: bool = False

    def logps(self, model, data: TokenizedData, idxs: list[int], device: torch.device) -> tuple[dict, dict]:
        """(the collated batch, pair_logps of it) for pairs `idxs` (an empty list: the dummy row)."""
        batch = collate_dpo_pairs(data.rows(idxs), self.pad_id, self.packed)
        return batch, pair_logps(model, batch, device, self.chunked)


def reference_cache(model, data: TokenizedData, cache_dir: str | Path, key: dict, d, layout: PairLayout) -> torch.Tensor:
    """Reference log-probs of every example, (N, 4) fp32 rows [chosen, rejected, chosen_avg, rejected_avg].

    Reused when cache_dir/manifest.json holds the same `key` and the COMPLETE marker exists; otherwise
    each rank scores its shard (`model` = the reference weights, in eval mode, no grad), writes
    rank{r}-of-{W}.safetensors keyed by example index, and rank 0 writes the manifest and, last, the
    marker. Both sums and averages are stored, so one cache serves every loss type. Every rank must call.
    """
    cache_dir = Path(cache_dir)
    manifest = cache_dir / "manifest.json"
    key = json.loads(json.dumps({**key, "examples": len(data)}))  # as the manifest reads back (tuples -> lists)
    done = (cache_dir / "COMPLETE").exists() and manifest.exists() and json.loads(manifest.read_text())["key"] == key
    done = bool(all_reduce(torch.tensor(float(done), device=d.device), "min").item())  # every rank takes the same branch
    if done:
        print0(f"[dpo] reusing reference log-prob cache {cache_dir}")
    else:
        if d.rank == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)
            cache_dir.mkdir(parents=True)
        barrier()
        was_training = model.training
        model.eval()
        idx, rows = [], []
        with no_grad_forward(model):
            for mb in shard_batches(len(data), d.rank, d.world, layout.per_device):
                _, out = layout.logps(model, data, mb, d.device)
                if mb:
                    idx += mb
                    rows.append(torch.stack([out[k] for k in LOGP_KEYS], 1).cpu())
        model.train(was_training)
        values = torch.cat(rows) if rows else torch.zeros(0, 4)
        save_file({"index": torch.tensor(idx, dtype=torch.int64), "logps": values.contiguous()},
                  str(cache_dir / f"rank{d.rank}-of-{d.world}.safetensors"))
        barrier()
        if d.rank == 0:
            files = [f"rank{r}-of-{d.world}.safetensors" for r in range(d.world)]
            manifest.write_text(json.dumps({"key": key, "files": files,
                                            "columns": list(LOGP_KEYS)}, indent=1))
            (cache_dir / "COMPLETE").write_text("ok\n")
        barrier()
        print0(f"[dpo] wrote reference log-prob cache for {len(data)} pairs to {cache_dir}")
    table = torch.full((len(data), 4), float("nan"))
    for name in json.loads(manifest.read_text())["files"]:
        part = load_file(str(cache_dir / name))
        table[part["index"]] = part["logps"]
    assert not table.isnan().any(), f"{cache_dir}: cache misses some examples"
    return table


def cached_logps(table: torch.Tensor, idxs: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The reference log-probs of a micro-batch's pairs from the cache table, as pair_logps returns them."""
    if not idxs:
        return {k: torch.zeros(1, device=device) for k in LOGP_KEYS}
    t = table[torch.tensor(idxs)].to(device)  # (B, 4)
    return {"chosen": t[:, 0], "rejected": t[:, 1], "chosen_avg": t[:, 2], "rejected_avg": t[:, 3]}


def pair_loss(loss_type, policy: dict, reference: dict | None, beta: float, gamma_beta_ratio: float,
              label_smoothing: float):
    """Dispatch one DPO_LOSSES entry on pair_logps outputs: the summed or averaged log-probs the loss
    type names, the policy averages for wpo's weight, no reference at all for simpo."""
    sfx = "_avg" if loss_type.average_log_prob else ""
    rc, rr = (reference[f"chosen{sfx}"], reference[f"rejected{sfx}"]) if loss_type.needs_reference else (None, None)
    return loss_type.fn(policy[f"chosen{sfx}"], policy[f"rejected{sfx}"], rc, rr, beta=beta,
                        label_smoothing=label_smoothing, gamma_beta_ratio=gamma_beta_ratio,
                        policy_chosen_avg=policy["chosen_avg"], policy_rejected_avg=policy["rejected_avg"])


def evaluate_dpo(model, data: TokenizedData, reference_fn, loss_kw: dict, d, layout: PairLayout) -> dict[str, float]:
    """Per-pair means of the loss metrics over the whole held-out set, across ranks (collective).

    reference_fn(idxs, batch) -> reference log-probs of those pairs (a cache lookup or a live forward).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    with no_grad_forward(model):
        for mb in shard_batches(len(data), d.rank, d.world, layout.per_device):
            batch, policy = layout.logps(model, data, mb, d.device)
            _, m = pair_loss(policy=policy, reference=reference_fn(mb, batch), **loss_kw)
            for k, v in m.items():  # sums over the micro-batch's pairs (0 for the dummy row)
                sums[k] = sums.get(k, 0.0) + (v.float() if mb else 0.0 * v.float())
    model.train(was_training)
    names = sorted(sums)
    values = all_reduce(torch.stack([sums[k] for k in names]).to(d.device)) / len(data)  # (M,)
    return {f"eval/{k}": v for k, v in zip(names, values.tolist())}
