"""A model's weights in two layouts: the checkpoint's (what `save_pretrained` writes and vLLM loads) and
the model's in memory, as the conversion mapping its class declares (transformers 5,
`transformers.conversion_mapping.get_model_conversion_mapping`).

Most models hold their weights as the files name them. Mixture-of-experts models do not: Qwen3-MoE and
OLMoE keep each layer's experts fused in memory (`mlp.experts.gate_up_proj`, (experts, 2·I, H)) while
their files hold one `mlp.experts.{e}.gate_proj.weight` and `up_proj.weight` per expert; the class's
mapping says so with `MergeModulelist(dim=0)` (stack the experts) then `Concatenate(dim=1)`.

`Layout(model)` reads that mapping once and answers, per in-memory parameter, which checkpoint tensors
make it (`fused(name)`), so that
- loading reads only this rank's rows: FSDP2 shards dim 0, the experts, so a rank reads just its own
  experts' files' tensors (`read_fused`);
- the export and the weight sync write the checkpoint layout back (`to_checkpoint`): the layout
  `save_pretrained` writes, the names vLLM's `load_weights` expects;
- an engine holding the model in memory assembles what arrives back (`from_checkpoint`).
Renamings (`WeightRenaming`, e.g. the legacy `LayerNorm.gamma` -> `.weight`) apply to checkpoint names
on load. Operations other than stacking and concatenation raise, naming the model and the operation.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fused:
    """An in-memory parameter made of several checkpoint tensors. sources: their names, with "{e}" for
    the expert index when `stacked` (dim 0 of the parameter is the expert); dim: the dimension the
    sources are concatenated along, in one expert's slice when stacked, else in the parameter."""
    sources: tuple[str, ...]
    stacked: bool
    dim: int

    def names(self, experts: int) -> list[str]:
        """Every checkpoint name this parameter writes, in the order `to_checkpoint` yields them."""
        if not self.stacked:
            return list(self.sources)
        return [s.format(e=e) for e in range(experts) for s in self.sources]


def _plain(pattern: str) -> str | None:
    """A transformers key pattern as a plain dotted suffix, or None where it is a real regex."""
    p = pattern.removeprefix("^").removesuffix("$").replace(r"\.", ".")
    return None if re.search(r"[\\()\[\]?+|]", p) else p


def _fused_from(converter, model_name: str) -> tuple[bool, int]:
    """(stacked, concatenation dim) of a converter's operations, or raise naming what is unsupported."""
    ops = [type(op).__name__ for op in converter.operations]
    if ops == ["MergeModulelist"] and converter.operations[0].dim == 0:
        return True, 0
    if ops == ["MergeModulelist", "Concatenate"] and converter.operations[0].dim == 0:
        return True, converter.operations[1].dim - 1
    if ops == ["Concatenate"]:
        return False, converter.operations[0].dim
    raise NotImplementedError(f"{model_name}: its checkpoint conversion {ops} (sources "
                              f"{converter.source_patterns} -> {converter.target_patterns}) is not supported by "
                              "tulu's row-wise loader (stacking experts and concatenating are)")


class Layout:
    """The checkpoint <-> in-memory mapping of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        self.model_name = type(model).__name__
        self.converters, self.renamings = [], []
        self._cache: dict[str, Fused | None] = {}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
        except ImportError:  # transformers < 5: weights live as the files name them
            return
        for transform in get_model_conversion_mapping(model):
            if type(transform).__name__ == "WeightConverter":
                self.converters.append(transform)
            elif type(transform).__name__ == "WeightRenaming":
                self.renamings.append(transform)

    def rename(self, checkpoint_name: str) -> str:
        """The in-memory name of a checkpoint tensor that the class renames (else the name itself)."""
        for r in self.renamings:
            checkpoint_name, _ = r.rename_source_key(checkpoint_name)
        return checkpoint_name

    def fused(self, name: str) -> Fused | None:
        """How the in-memory parameter `name` is made from checkpoint tensors, or None when the files
        hold it under its own name."""
        if name not in self._cache:
            self._cache[name] = self._find(name)
        return self._cache[name]

    def _find(self, name: str) -> Fused | None:
        for conv in self.converters:
            for target in conv.target_patterns:
                t = _plain(target)
                if t is None or not (name == t or name.endswith("." + t)):
                    continue
                sources = [_plain(s) for s in conv.source_patterns]
                if None in sources:
                    raise NotImplementedError(f"{self.model_name}: checkpoint conversion with regex sources "
                                              f"{conv.source_patterns} for {name!r} is not supported")
                stacked, dim = _fused_from(conv, self.model_name)
                prefix = name[: len(name) - len(t)]
                return Fused(tuple(prefix + s.replace("*", "{e}") for s in sources), stacked, dim)
        return None

    def checkpoint_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """(checkpoint name, shape) of each tensor the parameter `name` of `shape` writes, in order."""
        f = self.fused(name)
        if f is None:
            return [(name, tuple(shape))]
        part = list(shape[1:] if f.stacked else shape)
        part[f.dim] //= len(f.sources)  # concatenated sources are equal parts (transformers' Chunk)
        return [(n, tuple(part)) for n in f.names(shape[0] if f.stacked else 0)]

    def to_checkpoint(self, name: str, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The full in-memory parameter as the checkpoint tensors it stands for (views, no copy)."""
        f = self.fused(name)
        if f is None:
            yield name, full
            return
        if not f.stacked:
            yield from zip(f.sources, full.chunk(len(f.sources), dim=f.dim))
            return
        for e in range(full.shape[0]):
            for source, part in zip(f.sources, full[e].chunk(len(f.sources), dim=f.dim)):
                yield source.format(e=e), part

    def from_checkpoint(self, named: Iterable[tuple[str, torch.Tensor]],
                        params: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint-layout (name, tensor) pairs back into in-memory parameters of `params` (name ->
        tensor, for shapes): a fused parameter is yielded once all of its sources have arrived (the
        sender sends them together), plain ones as they come. Tensors are copied into the buffer of
        their parameter, so a received view may be reused by the sender right after."""
        owner = {}
        for pname, p in params.items():
            f = self.fused(pname)
            if f is not None:
                for i, n in enumerate(f.names(p.shape[0] if f.stacked else 0)):
                    owner[n] = (pname, i)
        pending: dict[str, tuple[torch.Tensor, int]] = {}
        for name, t in named:
            if name not in owner:
                yield self.rename(name), t
                continue
            pname, i = owner[name]
            f, p = self.fused(pname), params[pname]
            buf, seen = pending.get(pname) or (torch.empty(p.shape, dtype=t.dtype, device=t.device), 0)
            per = len(f.sources)
            dst = buf[i // per] if f.stacked else buf
            dst.narrow(f.dim, (i % per) * t.shape[f.dim], t.shape[f.dim]).copy_(t)
            if seen + 1 == len(f.names(p.shape[0] if f.stacked else 0)):
                pending.pop(pname, None)
                yield pname, buf
            else:
                pending[pname] = (buf, seen + 1)
        if pending:
            raise ValueError(f"{self.model_name}: incomplete fused parameters {sorted(pending)} (sources missing)")


def read_fused(f: Fused, local: torch.Tensor, row0: int, open_file) -> None:
    """local <- rows row0 : row0 + len(local) of the fused parameter, read from the sources' files
    (`open_file(checkpoint_name)` -> its TensorFile). Stacked: row = expert, so a rank reads only its
    own experts' tensors. Concatenated along dim 0: the rows span the sources in turn; along another
    dim: the same rows of every source, side by side."""
    if f.stacked:
        for i in range(local.shape[0]):
            _read_parts([s.format(e=row0 + i) for s in f.sources], local[i], None, f.dim, open_file)
        return
    if f.dim != 0:
        _read_parts(list(f.sources), local, row0, f.dim, open_file)
        return
    start = 0  # dim 0: each source covers rows [start, start + its rows) of the parameter
    for source in f.sources:
        tf = open_file(source)
        n = tf.shape(source)[0]
        lo, hi = max(row0, start), min(row0 + local.shape[0], start + n)
        if hi > lo:
            tf.read_rows(source, local[lo - row0: hi - row0], lo - start)
        start += n


def _read_parts(sources: list[str], dst: torch.Tensor, first_row: int | None, dim: int, open_file) -> None:
    """dst <- the sources concatenated along `dim` (whole tensors, or rows first_row.. of each)."""
    offset = 0
    for source in sources:
        tf = open_file(source)
        width = tf.shape(source)[dim]
        part = dst.narrow(dim, offset, width)
        if first_row is None:
            if dst.ndim and part.shape[0] != tf.shape(source)[0]:
                raise ValueError(f"{source}: shape {tf.shape(source)} does not fit {tuple(dst.shape)}")
            tf.read_rows(source, part)
        else:
            tf.read_rows(source, part, first_row)
        offset += width
