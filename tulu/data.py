"""Datasets for every stage (tokenized, validated, cached on disk) and the per-step batch layout.

The data position of a run is counted in global samples: optimizer step s of epoch e consumes
samples [s·G, (s+1)·G) of the epoch's permutation (G = per_device · grad_accum · world), so a run
resumes at the same place whatever the world size or batch layout.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch

from tulu import mixer as mixing
from tulu.chat import DataError, check_messages, tokenize_sft
from tulu.dist import barrier, is_node_leader, print0
from tulu.packing import best_fit_decreasing, deal_bins
from tulu.tiny import cache_root

CACHE_VERSION = "1"  # bump when a tokenize function changes meaning


@dataclass
class TokenizedData:
    """Tokenized rows (an Arrow-backed dataset) plus each row's length in tokens."""

    ds: datasets.Dataset
    lengths: np.ndarray
    dropped: int = 0  # no trainable token left after truncation (or over a length limit)
    skipped: int = 0  # bad rows skipped under --skip_bad_rows

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, idxs: list[int]) -> list[dict]:
        return [self.ds[int(i)] for i in idxs]


def _sft_row(tokenizer, max_seq_length, skip_bad_rows):
    def fn(row, where):
        try:
            if "messages" not in row or row["messages"] is None:
                raise DataError(f"{where}: missing field 'messages'")
            check_messages(row["messages"], where)
        except DataError:
            if not skip_bad_rows:
                raise
            return {"input_ids": [], "labels": [], "status": "bad"}
        out = tokenize_sft(tokenizer, row["messages"], max_seq_length)
        return {**(out or {"input_ids": [], "labels": []}), "status": "ok" if out else "dropped"}
    return fn


def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else str(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((body + str(tokenizer.chat_template)).encode()).hexdigest()[:16]


def build_dataset(kind: str, mixer: dict, tokenizer, row_fn: Callable, key_parts: list, split: str = "train",
                  shuffle: bool = True, mix_dir: str | None = None, num_proc: int | None = None,
                  is_main: bool = True, allow_empty: bool = False) -> TokenizedData:
    """Mix, validate and tokenize once (rank 0), cache under $TULU_CACHE/tokenized/<key>, load everywhere.

    row_fn(row, where) -> dict of token columns + "status" in {"ok", "dropped", "bad"}, where `where`
    names the row in errors; the key covers the data (names, amounts, local file stamps), the
    tokenizer, the template and `key_parts`. A node that cannot see rank 0's cache (TULU_CACHE not on
    a shared filesystem) tokenizes its own copy.
    """
    key = hashlib.sha256(repr([kind, CACHE_VERSION, mixing.fingerprint(mixer, split), shuffle,
                               tokenizer_key(tokenizer), key_parts]).encode()).hexdigest()[:20]
    path = cache_root() / "tokenized" / f"{kind}-{key}"
    if is_main and (mix_dir or not path.exists()):
        parts = mixing.load_mixture(mixer, split=split, shuffle=shuffle, mix_dir=mix_dir)
        if not path.exists():
            _tokenize_to(path, kind, parts, row_fn, num_proc)
    barrier()
    if not path.exists() and is_node_leader():
        print(f"[data] {path} is not visible on this node (TULU_CACHE is not shared): tokenizing here too", flush=True)
        _tokenize_to(path, kind, mixing.load_mixture(mixer, split=split, shuffle=shuffle), row_fn, num_proc)
    barrier()
    ds = datasets.load_from_disk(str(path))
    dropped, skipped = (int(x) for x in (path / "counts.txt").read_text().split())
    if not len(ds) and not allow_empty:
        raise DataError(f"{kind} data {list(mixer)}: no row is left ({dropped} dropped with no trainable token "
                        f"after truncation or over a length limit, {skipped} bad rows skipped)")
    if dropped or skipped:
        print0(f"[data] {kind}: kept {len(ds)} rows; dropped {dropped} with no trainable token left "
               f"after truncation; skipped {skipped} bad rows")
    return TokenizedData(ds.with_format(None), np.asarray(ds["length"]), dropped, skipped)


def _tokenize_to(path: Path, kind: str, parts: list[tuple[str, datasets.Dataset]], row_fn: Callable,
                 num_proc: int | None) -> None:
    """Tokenize each source on its own (sources may disagree on their other columns), keep the "ok"
    rows, and move the result into `path` in one rename (a crash never leaves a cache that looks done)."""
    if not sum(len(ds) for _, ds in parts):
        raise DataError(f"the mixture {[name for name, _ in parts]} selects no rows")
    tokenized = [ds.map(lambda row, name=name: row_fn(row, f"dataset {name!r}, row {row['_row']} (id {row['id']})"),
                        num_proc=num_proc, remove_columns=[c for c in ds.column_names if c != "id"],
                        desc=f"tokenizing {kind} {name}") for name, ds in parts if len(ds)]
    out = datasets.concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]
    status = np.array(out["status"])
    out = out.select(np.flatnonzero(status == "ok"))
    if "length" not in out.column_names:  # a row_fn may report its own length (e.g. a pair's total)
        col = "input_ids" if "input_ids" in out.column_names else out.column_names[1]
        out = out.add_column("length", [len(x) for x in out[col]])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=path.parent))
    out.remove_columns("status").save_to_disk(str(tmp), num_shards=1 if not len(out) else None)  # 0 shards won't load
    (tmp / "counts.txt").write_text(f"{int((status == 'dropped').sum())} {int((status == 'bad').sum())}")
    try:
        os.rename(tmp, path)
    except OSError:  # another node's rank wrote the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def build_sft_data(mixer: dict, tokenizer, max_seq_length: int | None, skip_bad_rows: bool = False,
                   mix_dir: str | None = None, num_proc: int | None = None, is_main: bool = True) -> TokenizedData:
    return build_dataset("sft", mixer, tokenizer, _sft_row(tokenizer, max_seq_length, skip_bad_rows),
                         [max_seq_length, skip_bad_rows], mix_dir=mix_dir, num_proc=num_proc, is_main=is_main)


# ------------------------------------------------------------------------------ step layout


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """accelerate's SeedableRandomSampler order: randperm(n) seeded with seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def step_samples(perm: torch.Tensor, step_in_epoch: int, global_batch: int) -> list[int]:
    """The global batch of one optimizer step; the epoch's last step wraps to its start (like
    accelerate's even_batches) so every step has exactly global_batch samples."""
    n = len(perm)
    return [int(perm[i % n]) for i in range(step_in_epoch * global_batch, (step_in_epoch + 1) * global_batch)]


def rank_microbatches(samples: list[int], lengths: np.ndarray, rank: int, world: int, per_device: int,
                      grad_accum: int, packing: bool, capacity: int) -> list[list[int]]:
    """This rank's micro-batches (lists of row ids) for one step.

    Unpacked: the original layout, micro-batch k of the global batch goes to rank k mod world.
    Packed: best-fit-decreasing bins of at most `capacity` tokens over the whole global batch, dealt
    so every rank runs the same number of micro-batches (each becomes one padding-free row).
    """
    if not packing:
        mbs = [samples[k * per_device:(k + 1) * per_device] for k in range(grad_accum * world)]
        return [mbs[j * world + rank] for j in range(grad_accum)]
    sizes = [int(lengths[i]) for i in samples]
    # Cap the bin size so the batch spreads over at least world·grad_accum rows: best fit alone would
    # fill as few bins as possible and leave some ranks an empty micro-batch.
    capacity = min(capacity, max(max(sizes), -(-sum(sizes) // (world * grad_accum))))
    bins = best_fit_decreasing(sizes, capacity)
    return [[samples[i] for i in b] for b in deal_bins(bins, sizes, world)[rank]]


class StepBatches:
    """What each optimizer step trains on: `batches(step, capacity)` returns the step's global batch
    (global_batch row ids, the same on every rank) and this rank's micro-batches of it (lists of row
    ids). Epochs reshuffle with epoch_permutation; the epoch's permutation is kept between steps.
    capacity: the largest packed row in tokens, or a function of the step's rows that gives it."""

    def __init__(self, lengths: np.ndarray, seed: int, global_batch: int, rank: int, world: int, per_device: int,
                 grad_accum: int, packing: bool):
        self.lengths, self.seed, self.global_batch = lengths, seed, global_batch
        self.rank, self.world, self.per_device, self.grad_accum, self.packing = rank, world, per_device, grad_accum, packing
        self.steps_per_epoch = -(-len(lengths) // global_batch)
        self._perm, self._epoch = None, None

    def __call__(self, step: int, capacity) -> tuple[list[int], list[list[int]]]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self._epoch != epoch:
            self._perm, self._epoch = epoch_permutation(len(self.lengths), self.seed, epoch), epoch
        samples = step_samples(self._perm, step_in_epoch, self.global_batch)
        if callable(capacity):
            capacity = capacity(samples)
        return samples, rank_microbatches(samples, self.lengths, self.rank, self.world, self.per_device,
                                          self.grad_accum, self.packing, capacity)

