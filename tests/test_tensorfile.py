"""tulu.tensorfile reads the same values as safetensors' own reader, in place, and refuses bad files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tulu.tensorfile import TensorFile, save_tensors


@pytest.fixture
def sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 5, generator=g), "h": torch.randn(6, 3, generator=g).to(torch.bfloat16),
               "ids": torch.randint(-9, 9, (4,), generator=g), "mask": torch.rand(3, 2, generator=g) > 0.5,
               "step": torch.tensor(12.0), "empty": torch.zeros(0, 4)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"rows": "{}"})
    return path, tensors


def test_reads_match_safetensors(sample):
    path, tensors = sample
    with TensorFile(path) as f, safe_open(str(path), "pt") as ref:
        assert set(f.keys()) == set(tensors) and f.metadata == {"rows": "{}"}
        for name in tensors:
            assert torch.equal(f.read(name), ref.get_tensor(name)), name
            assert f.read(name).dtype == tensors[name].dtype
        for first, stop in ((0, 7), (2, 5), (6, 7), (3, 3)):  # row ranges, read in place
            dst = torch.full((stop - first, 5), float("nan"))
            ptr = dst.data_ptr()
            f.read_rows("w", dst, first)
            assert dst.data_ptr() == ptr and torch.equal(dst, ref.get_slice("w")[first:stop])


def test_converts_into_other_dtypes_and_views(sample):
    path, tensors = sample
    with TensorFile(path) as f:
        dst = torch.zeros(4, 3)  # bf16 rows into fp32: through a temporary, then converted
        f.read_rows("h", dst, 2)
        assert torch.equal(dst, tensors["h"][2:6].float())
        big = torch.zeros(10, 5)
        f.read_rows("w", big[3:6], 1)  # a contiguous view: written in place, the rest untouched
        assert torch.equal(big[3:6], tensors["w"][1:4]) and big[:3].abs().sum() == 0 and big[6:].abs().sum() == 0
        col = torch.zeros(5, 7).t()  # non-contiguous destination
        f.read_rows("w", col, 0)
        assert torch.equal(col, tensors["w"])


def test_refuses_wrong_shapes_truncated_and_foreign_files(sample, tmp_path):
    path, _ = sample
    with TensorFile(path) as f:
        with pytest.raises(ValueError, match="cannot read rows 5:9 of w"):
            f.read_rows("w", torch.zeros(4, 5), 5)
        with pytest.raises(ValueError, match="into a tensor of shape"):
            f.read_rows("w", torch.zeros(2, 4))
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            f.read("nope")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-20])
    with TensorFile(cut) as f, pytest.raises(EOFError, match="truncated"):
        for name in f.keys():
            f.read(name)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        TensorFile(junk)


def test_streamed_writer_is_read_back_by_safetensors(sample, tmp_path):
    _, tensors = sample
    tensors = {**tensors, "strided": torch.arange(12.0).reshape(3, 4).t()}  # non-contiguous input
    path = tmp_path / "ours.safetensors"
    save_tensors(path, tensors, metadata={"rows": '{"w": [0, 7]}'})
    with safe_open(str(path), "pt") as ref, TensorFile(path) as f:
        assert ref.metadata() == {"rows": '{"w": [0, 7]}'} and f.metadata == ref.metadata()
        assert set(ref.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(ref.get_tensor(name), t) and ref.get_tensor(name).dtype == t.dtype, name
            assert torch.equal(f.read(name), t), name
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # header padded: data 8-byte aligned
