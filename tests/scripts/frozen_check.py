"""A frozen model (tulu.model.build_model(frozen=True)) against the trainable build of the same weights.

    torchrun --standalone --nproc_per_node 2 tests/scripts/frozen_check.py --out /tmp/f

Both are built from the embedded tiny model with bf16 compute; each rank writes OUT.rank<R>.json
with whether their no-grad logits are bitwise equal, both builds' parameter bytes on this rank, and
whether any frozen parameter requires grad (tests/test_memory.py compares with the simulation).

Then, on an fp32 trainable build (RLVR's CPU setting): after a no-grad forward, which parameters are
plain (unsharded) tensors after the root's reshard() and after tulu.fsdp.reshard(), the rows a
checkpoint written then holds, and whether a forward + backward afterwards runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tulu.dist import init_dist, shutdown  # noqa: E402
from tulu.fsdp import reshard  # noqa: E402
from tulu.fsdp import local_rows  # noqa: E402
from tulu.model import build_model  # noqa: E402
from tulu.checkpoint import save_checkpoint  # noqa: E402
from tulu.tensorfile import TensorFile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d = init_dist()
    trainable = build_model("tulu/tiny", d.device, compute_dtype="bf16")
    frozen = build_model("tulu/tiny", d.device, compute_dtype="bf16", frozen=True)
    nbytes = lambda m: sum(local_rows(p)[0].numel() * p.element_size() for p in m.parameters())  # noqa: E731
    sizes = {"trainable_bytes": nbytes(trainable), "frozen_bytes": nbytes(frozen)}
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0)).to(d.device)
    with torch.no_grad():
        a, b = trainable(input_ids=ids).logits, frozen(input_ids=ids).logits
    result = {"rank": d.rank, "logits_equal": torch.equal(a, b), "logits_dtype": str(b.dtype),
              "requires_grad": any(p.requires_grad for p in frozen.parameters()),
              "frozen_dtypes": sorted({str(p.dtype) for p in frozen.parameters()}), **sizes}
    del trainable, frozen, a, b
    result.update(_reshard_then_checkpoint_then_backward(d, ids, Path(f"{args.out}.ckpt")))
    Path(f"{args.out}.rank{d.rank}.json").write_text(json.dumps(result))
    shutdown()


def _reshard_then_checkpoint_then_backward(d, ids: torch.Tensor, out: Path) -> dict:
    model = build_model("tulu/tiny", d.device, compute_dtype="fp32")
    plain = lambda: sorted(n for n, p in model.named_parameters() if not hasattr(p, "to_local"))  # noqa: E731
    with torch.no_grad():
        model(input_ids=ids)
    model.reshard()  # the root's unit only
    after_root = plain()
    reshard(model)  # every unit
    after_all = plain()
    save_checkpoint(out, 1, {"model": (model, None)}, {}, d)
    f = TensorFile(out / "checkpoints" / "step_1" / f"model-rank{d.rank:05d}.safetensors")
    rows = {n: f.shape(n)[0] for n in f.keys()}
    local = {n: local_rows(p)[0].shape[0] for n, p in model.named_parameters()}
    model(input_ids=ids, labels=ids).loss.backward()  # FSDP frees the gathered lm_head after backward
    del model
    return {"plain_after_root_reshard": after_root, "plain_after_reshard": after_all,
            "checkpoint_rows_are_local": rows == local, "backward_ran": True}


if __name__ == "__main__":
    main()
