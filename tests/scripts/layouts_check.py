"""Load, export and checkpoint each model family under FSDP2 (tests/test_families.py).

    torchrun --standalone --nproc_per_node 2 tests/scripts/layouts_check.py --models DIR --out DIR save
    python tests/scripts/layouts_check.py --models DIR --out DIR load      # a world of one: resume there

save (2 ranks), per family: build_model (each rank reads only its rows; MoE experts from their
per-expert tensors) and compare its logits with transformers' from_pretrained of the same folder; one
SGD step on a seeded batch; a training checkpoint (out/<family>/ckpt) and a Hugging Face export
(out/<family>/export). load (1 rank): the same build, the checkpoint loaded at the other world size,
exported again (out/<family>/reloaded). Writes out/<mode>.json: the logit gaps per family.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tulu.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from tulu.dist import init_dist, shutdown  # noqa: E402
from tulu.export import export_hf  # noqa: E402
from tulu.fsdp import no_grad_forward  # noqa: E402
from tulu.model import attention_for, build_model, load_tokenizer  # noqa: E402


def reference_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    attn = attention_for(config, AutoModelForCausalLM._model_mapping[type(config)], "sdpa")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        return ref(input_ids=x, use_cache=False).logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("mode", choices=["save", "load"])
    args = ap.parse_args()
    d = init_dist()
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    gaps = {}
    for folder in sorted(args.models.iterdir()):
        out = args.out / folder.name
        tokenizer = load_tokenizer(str(folder))
        model = build_model(str(folder), d.device, compute_dtype="fp32", seed=0)
        if args.mode == "save":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)  # before any no-grad forward (tulu.fsdp.reshard)
            with no_grad_forward(model):
                gaps[folder.name] = (model(input_ids=x).logits - reference_logits(folder, x)).abs().max().item()
            batch = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1 + d.rank))
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            save_checkpoint(out, 1, {"model": (model, None)}, {"samples_seen": 1}, d)
            export_hf(model, tokenizer, out / "export", d.is_main)
        else:
            load_checkpoint(out / "checkpoints" / "step_1", {"model": (model, None)}, d)
            export_hf(model, tokenizer, out / "reloaded", d.is_main)
        del model
    if d.is_main:
        (args.out / f"{args.mode}.json").write_text(json.dumps(gaps))
    shutdown()


if __name__ == "__main__":
    main()
