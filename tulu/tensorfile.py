"""safetensors files read and written one tensor at a time, with plain file I/O.

Reading: rows of a tensor go straight into an existing tensor.

`safetensors.safe_open` maps the whole file and returns a new tensor for every slice: loading a
shard costs a copy out of the map and another into the parameter, and the mapped pages count in
the process's resident set while the file is open (measured by benchmarks/checkpoint.py: a 1.1B
model's resume peaked at 4.9 GiB RSS on rank 0 that way). Here only the header is parsed (the
format: an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
data_offsets, then the data; github.com/huggingface/safetensors, "Format") and the requested rows
are read into the destination itself, or into one temporary of the slice's size when the
destination's dtype, device or layout differs from the file's.

Writing (`save_tensors`): the header is computed from shapes and dtypes, then each tensor is copied
to the host only while it is written, so saving GPU shards needs host memory for one tensor, not
for the whole rank's state (as `safetensors.torch.save_file` of host copies would).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, shared with it (writable)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class TensorWriter:
    """A safetensors file written tensor by tensor: the header comes from `specs` (name, dtype,
    shape), then `write` takes the tensors in that order, from any device; `close` checks that all
    came. The host holds one tensor at a time."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces: the data starts 8-byte aligned
        self.path, self.specs, self._done = Path(path), specs, 0
        self._f = open(self.path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        name, dtype, shape = self.specs[self._done]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.path}: {name} is {dtype} {list(shape)} in the header, got {t.dtype} {list(t.shape)}")
        host = t.detach().to("cpu").contiguous()
        self._f.write(_bytes(host))
        self._done += 1

    def close(self) -> None:
        self._f.close()
        if self._done != len(self.specs):
            raise ValueError(f"{self.path}: {self._done} of {len(self.specs)} tensors written")

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._f.close() if exc_type else self.close()  # an error inside: keep it, not a count mismatch


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (any device) as a safetensors file, streaming one tensor at a time."""
    with TensorWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata) as w:
        for t in tensors.values():
            w.write(t)


class TensorFile:
    """One open safetensors file: `keys()`, `shape(name)`, `metadata`, `read(name)`, and
    `read_rows(name, dst, first)` to fill `dst` with rows first:first+len(dst) of a tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        n = int.from_bytes(self._f.read(8), "little")
        if not 0 < n <= min(_MAX_HEADER, self.path.stat().st_size - 8):
            self._f.close()
            raise ValueError(f"{self.path}: not a safetensors file (header length {n})")
        header = json.loads(self._f.read(n))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + n

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, as a new CPU tensor in the file's dtype."""
        out = torch.empty(self.shape(name), dtype=self.dtype(name))
        self.read_rows(name, out)
        return out

    def read_rows(self, name: str, dst: torch.Tensor, first: int = 0) -> None:
        """dst <- rows first:first+dst.shape[0] of `name` (dim 0; a 0-d dst takes a 0-d tensor)."""
        shape, dtype = self.shape(name), self.dtype(name)
        rows = dst.shape[0] if dst.ndim else 0
        if tuple(dst.shape[1:]) != shape[1:] or (dst.ndim == 0) != (len(shape) == 0) or first + rows > (shape or (0,))[0]:
            raise ValueError(f"{self.path}: cannot read rows {first}:{first + rows} of {name} {list(shape)} "
                             f"into a tensor of shape {list(dst.shape)}")
        direct = dst.device.type == "cpu" and dst.dtype == dtype and dst.is_contiguous()
        buf = dst.detach() if direct else torch.empty(dst.shape, dtype=dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._read_into(self._data_start + self._entry(name)["data_offsets"][0] + first * row_bytes, buf)
        if not direct:
            dst.detach().copy_(buf)

    def _entry(self, name: str) -> dict:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def _read_into(self, offset: int, t: torch.Tensor) -> None:
        view = _bytes(t)
        self._f.seek(offset)
        done = 0
        while done < len(view):
            n = self._f.readinto(view[done:])
            if not n:
                raise EOFError(f"{self.path}: file ends at byte {offset + done}, inside a tensor (truncated?)")
            done += n

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
