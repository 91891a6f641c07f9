"""Export the embedded tiny model from a 2-rank FSDP2 build in small shards (tests/test_export.py).

    torchrun --standalone --nproc_per_node 2 tests/scripts/export_check.py --out DIR --max_shard_bytes N [--dtype bf16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tulu.export import export_hf  # noqa: E402
from tulu.dist import init_dist, shutdown  # noqa: E402
from tulu.model import build_model, load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--max_shard_bytes", type=int, required=True)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    args = ap.parse_args()
    d = init_dist()
    model = build_model("tulu/tiny", d.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    export_hf(model, load_tokenizer("tulu/tiny"), args.out, d.is_main, max_shard_bytes=args.max_shard_bytes, dtype=dtype)
    del model
    shutdown()


if __name__ == "__main__":
    main()
