"""Build policy / reference / reward / value models (HF classes) sharded from the start.

Recipe (gpt-fast / torchtitan): build on the meta device, shard with FSDP2, allocate only this
rank's shards, then read exactly those rows from the safetensors files. No rank ever holds the
whole model. Export goes the other way: a streamed gather, one output shard at a time on rank 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tulu.fsdp import DTYPES, apply_fsdp, local_rows
from tulu.tensorfile import TensorFile
from tulu.tiny import TINY_NAME, tiny_dir

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")


def flash_attn_or_fallback(requested: bool, device: torch.device) -> bool:
    """--use_flash_attn where it can run: flash-attn importable and a CUDA device. Otherwise False:
    sdpa with the block-diagonal mask that keeps packed documents apart (the presets pass the flag,
    and flash-attn has no binary wheels), said once in a warning that names the fallback."""
    if not requested:
        return False
    import importlib.util

    why = ("no CUDA device" if device.type != "cuda" else
           "flash-attn is not installed (no binary wheels; `pip install flash-attn` builds it from source)"
           if importlib.util.find_spec("flash_attn") is None else None)
    if why:
        from tulu.dist import print0

        print0(f"[model] WARNING: --use_flash_attn: {why}; using sdpa with a block-diagonal mask per packed row")
        return False
    return True


def resolve(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder for a model name: the embedded tiny model, a local path, or a hub snapshot
    (config, tokenizer and safetensors only: no pickled weights, no remote code)."""
    if name_or_path == TINY_NAME:
        return tiny_dir()
    from tulu.convert_gguf import GGUF_MODELS, named_model_dir

    if name_or_path in GGUF_MODELS:  # a named GGUF model: converted once into $TULU_CACHE
        return named_model_dir(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # offline, missing repo, gated model...
        raise FileNotFoundError(f"model {name_or_path!r}: not a local folder and the hub download failed ({e})") from e


def load_tokenizer(name_or_path: str, revision: str | None = None, chat_template_name: str = "tulu",
                   use_slow_tokenizer: bool = False):
    from transformers import AutoTokenizer

    from tulu.chat import setup_tokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path, revision), use_fast=not use_slow_tokenizer,
                                        trust_remote_code=False)
    return setup_tokenizer(tok, chat_template_name)


def _weight_index(path: Path) -> dict[str, Path]:
    """checkpoint key -> safetensors file that holds it."""
    if (path / WEIGHT_FILES[0]).exists():
        weight_map = json.loads((path / WEIGHT_FILES[0]).read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    if (path / WEIGHT_FILES[1]).exists():
        with TensorFile(path / WEIGHT_FILES[1]) as f:
            return {k: path / WEIGHT_FILES[1] for k in f.keys()}
    raise FileNotFoundError(f"{path}: no safetensors weights ({' or '.join(WEIGHT_FILES)}); .bin files are not loaded")


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: Path, init_missing=None, seed: int = 0) -> dict[str, list[str]]:
    """Fill every parameter's local shard from `path`'s safetensors files, reading only its rows.

    A parameter with more rows than the checkpoint (embeddings grown for a new pad token) gets the
    extra rows from N(0, initializer_range), drawn from `seed` identically on every rank. A
    parameter absent from the checkpoint goes to `init_missing(name, full_shape) -> tensor` (e.g. a
    reward head); without one, that is an error. Returns the missing and unused checkpoint keys.
    """
    index = _weight_index(path)
    std = getattr(model.config, "initializer_range", 0.02)
    handles: dict[Path, TensorFile] = {}
    missing = []
    for name, p in model.named_parameters():
        local, row0 = local_rows(p)
        if local.numel() == 0:
            continue
        start, stop = row0, row0 + local.shape[0]  # this rank's global rows
        if name not in index:
            if init_missing is None:
                raise KeyError(f"{path}: checkpoint has no weight {name!r}")
            missing.append(name)
            local.copy_(init_missing(name, tuple(p.shape))[start:stop])
            continue
        f = handles.get(index[name]) or handles.setdefault(index[name], TensorFile(index[name]))
        if not f.shape(name):  # a 0-d parameter
            f.read_rows(name, local)
            continue
        n_ckpt = f.shape(name)[0]
        if min(stop, n_ckpt) > start:
            f.read_rows(name, local[: min(stop, n_ckpt) - start], start)
        if stop > n_ckpt:  # grown vocabulary: new rows drawn identically on every rank, at any world size
            new = torch.randn((p.shape[0] - n_ckpt, *p.shape[1:]), generator=torch.Generator().manual_seed(seed))
            first = max(start, n_ckpt)
            local[first - start :].copy_(new[first - n_ckpt : stop - n_ckpt] * std)
    for f in handles.values():
        f.close()
    used = {n for n, _ in model.named_parameters()}
    return {"missing": missing, "unused": sorted(set(index) - used)}


def reset_rotary_buffers(model: torch.nn.Module) -> None:
    """Recompute non-persistent rotary buffers (inv_freq), which `to_empty` leaves uninitialized."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config") and hasattr(module, "rope_type"):
            fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf.to(getattr(module, name).device))


def build_model(name_or_path: str, device: torch.device, *, kind: str = "causal_lm", revision: str | None = None,
                vocab_size: int | None = None, attn_implementation: str = "sdpa", compute_dtype: str = "fp32",
                cpu_offload: bool = False, reshard_after_forward: bool = True, gradient_checkpointing: bool = False,
                init_missing=None, seed: int = 0, frozen: bool = False) -> torch.nn.Module:
    """A sharded HF model with its weights loaded. kind: "causal_lm" or "reward" (one scalar head).

    frozen: a model that is only run, never trained (DPO's live reference; RLVR's reference and
    reward model). Its shards are stored in the compute dtype, not fp32: half the memory at bf16,
    and the same numbers, since FSDP would cast fp32 shards to that dtype at every all-gather anyway.
    It has no gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve(name_or_path, revision)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    config.use_cache = False  # with a cache, packed documents silently attend to each other
    if vocab_size is not None and vocab_size > config.vocab_size:
        config.vocab_size = (vocab_size + 7) // 8 * 8  # as open-instruct: resize to a multiple of 8
    if kind == "reward":
        config.num_labels = 1
    cls = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    with torch.device("meta"):
        model = cls.from_config(config, attn_implementation=attn_implementation,
                                dtype=DTYPES[compute_dtype] if frozen else torch.float32)
    apply_fsdp(model, compute_dtype=compute_dtype, cpu_offload=cpu_offload,
               reshard_after_forward=reshard_after_forward, activation_checkpointing=gradient_checkpointing)
    model.to_empty(device="cpu" if cpu_offload else device)
    load_weights(model, path, init_missing=init_missing, seed=seed)
    reset_rotary_buffers(model)
    model.name_or_path = str(path)
    return model.requires_grad_(False).eval() if frozen else model
