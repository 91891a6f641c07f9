"""A frozen model (tulu.model.build_model(frozen=True)) against the trainable build of the same weights.

    torchrun --standalone --nproc_per_node 2 tests/scripts/frozen_check.py --out /tmp/f

Both are built from the embedded tiny model with bf16 compute; each rank writes OUT.rank<R>.json
with whether their no-grad logits are bitwise equal, both builds' parameter bytes on this rank, and
whether any frozen parameter requires grad (tests/test_memory.py compares with the simulation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tulu.dist import init_dist, shutdown  # noqa: E402
from tulu.model import _local_rows, build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d = init_dist()
    trainable = build_model("tulu/tiny", d.device, compute_dtype="bf16")
    frozen = build_model("tulu/tiny", d.device, compute_dtype="bf16", frozen=True)
    nbytes = lambda m: sum(_local_rows(p)[0].numel() * p.element_size() for p in m.parameters())  # noqa: E731
    sizes = {"trainable_bytes": nbytes(trainable), "frozen_bytes": nbytes(frozen)}
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(d.device)
    with torch.no_grad():
        a, b = trainable(input_ids=ids).logits, frozen(input_ids=ids).logits
    result = {"rank": d.rank, "logits_equal": torch.equal(a, b), "logits_dtype": str(b.dtype),
              "requires_grad": any(p.requires_grad for p in frozen.parameters()),
              "frozen_dtypes": sorted({str(p.dtype) for p in frozen.parameters()}), **sizes}
    Path(f"{args.out}.rank{d.rank}.json").write_text(json.dumps(result))
    del trainable, frozen, a, b
    shutdown()


if __name__ == "__main__":
    main()
