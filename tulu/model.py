"""Build policy / reference / reward / value models (HF classes) sharded from the start.

Recipe (gpt-fast / torchtitan): build on the meta device, shard with FSDP2, allocate only this
rank's shards, then read exactly those rows from the safetensors files. No rank ever holds the
whole model. Export goes the other way: a streamed gather, one output shard at a time on rank 0.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tulu.fsdp import DTYPES, apply_fsdp, local_rows
from tulu.layouts import Layout, read_fused
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


def attention_for(config, model_class, requested: str) -> str:
    """The attention implementation a model runs with: what was asked (flash_attention_2 or sdpa)
    where the class supports it and it computes the model's attention exactly, else eager.

    Gemma 2 soft-caps its attention scores (config.attn_logit_softcapping): sdpa has no soft-capping,
    and transformers 5.19 runs it without (measured: logits 0.019 off eager's once the scores are
    large; later versions refuse), so such a model runs eager (flash-attn 2 soft-caps, so it stays).
    Packed rows stay apart in every implementation: transformers builds the block-diagonal mask from
    the restarting position_ids for sdpa and eager alike, and flash-attn takes cu_seqlens."""
    supports = {"sdpa": getattr(model_class, "_supports_sdpa", False),
                "flash_attention_2": getattr(model_class, "_supports_flash_attn", False)}
    why = None
    if requested != "eager" and not supports.get(requested, False):
        why = f"{model_class.__name__} has no {requested}"
    elif requested == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        why = f"{model_class.__name__} soft-caps attention scores (attn_logit_softcapping), which sdpa cannot"
    if why is None:
        return requested
    from tulu.dist import print0

    print0(f"[model] {why}: using eager attention")
    return "eager"


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

    Checkpoint names go through the class's renamings, and a parameter the class keeps fused in memory
    (a mixture-of-experts layer's experts) is read from its per-expert tensors, this rank's experts
    only (tulu/layouts.py). A parameter with more rows than the checkpoint (embeddings grown for a new
    pad token) gets the extra rows from N(0, initializer_range), drawn from `seed` identically on every
    rank. A parameter absent from the checkpoint goes to `init_missing(name, full_shape) -> tensor`
    (e.g. a reward head); without one, that is an error. Returns the missing and unused checkpoint keys.
    """
    layout = Layout(model)
    index = {layout.rename(k): f for k, f in _weight_index(path).items()}
    std = getattr(model.config, "initializer_range", 0.02)
    handles: dict[Path, TensorFile] = {}
    open_file = lambda key: handles.get(index[key]) or handles.setdefault(index[key], TensorFile(index[key]))  # noqa: E731
    missing, used = [], set()
    for name, p in model.named_parameters():
        local, row0 = local_rows(p)
        fused = layout.fused(name) if name not in index else None
        if fused is not None:
            sources = fused.names(p.shape[0] if fused.stacked else 0)
            absent = [s for s in sources if s not in index]
            if absent:
                raise KeyError(f"{path}: checkpoint has no weight {absent[0]!r} (one of the {len(sources)} "
                               f"tensors of {type(model).__name__}'s fused parameter {name!r})")
            used.update(sources)
            if local.numel():
                read_fused(fused, local, row0, open_file)
            continue
        used.add(name)
        if local.numel() == 0:
            continue
        start, stop = row0, row0 + local.shape[0]  # this rank's global rows
        if name not in index:
            if init_missing is None:
                raise KeyError(f"{path}: checkpoint has no weight {name!r}")
            missing.append(name)
            local.copy_(init_missing(name, tuple(p.shape))[start:stop])
            continue
        f = open_file(name)
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
    return {"missing": missing, "unused": sorted(set(index) - used)}


def init_buffers(model: torch.nn.Module) -> None:
    """Compute the buffers no checkpoint holds (rotary inv_freq, Gemma's embedding scale `embed_scale`),
    which `to_empty` leaves as garbage (measured: a Gemma 2 whose scale stayed 0 scored every sequence
    ~1e-28). The model's own `_init_weights` does it, as transformers' from_pretrained does: every
    parameter and saved buffer is marked initialized first, so its init functions skip them."""
    unsaved = {id(b) for _, b in model.named_non_persistent_buffers()} if hasattr(
        model, "named_non_persistent_buffers") else set()
    for t in [*model.parameters(), *(b for b in model.buffers() if id(b) not in unsaved)]:
        t._is_hf_initialized = True
    model.initialize_weights()


def model_class(config, kind: str = "causal_lm"):
    """The transformers class of `config` for kind "causal_lm" or "reward" (*ForSequenceClassification).
    A family that transformers gives no sequence-classification class (OLMoE) gets the one its
    siblings use: GenericForSequenceClassification (the base model, then a linear score head) on the
    family's own pretrained base, named as transformers would name it."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    if type(config) in auto._model_mapping:
        return auto._model_mapping[type(config)]
    if kind != "reward" or type(config) not in AutoModel._model_mapping:
        raise ValueError(f"{config.model_type}: transformers has no {auto.__name__.removeprefix('AutoModelFor')} "
                         "class for this model")
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.modeling_utils import PreTrainedModel

    base = AutoModel._model_mapping[type(config)]
    pretrained = next(c for c in base.__mro__[1:] if issubclass(c, PreTrainedModel) and c is not PreTrainedModel)
    name = base.__name__.removesuffix("Model") + "ForSequenceClassification"
    return type(name, (GenericForSequenceClassification, pretrained), {"__module__": base.__module__})


def build_model(name_or_path: str, device: torch.device, *, kind: str = "causal_lm", revision: str | None = None,
                vocab_size: int | None = None, attn_implementation: str = "sdpa", compute_dtype: str = "fp32",
                cpu_offload: bool = False, reshard_after_forward: bool = True, gradient_checkpointing: bool = False,
                init_missing=None, seed: int = 0, frozen: bool = False) -> torch.nn.Module:
    """A sharded HF model with its weights loaded. kind: "causal_lm" or "reward" (one scalar head).

    frozen: a model that is only run, never trained (DPO's live reference; RLVR's reference and
    reward model). Its shards are stored in the compute dtype, not fp32: half the memory at bf16,
    and the same numbers, since FSDP would cast fp32 shards to that dtype at every all-gather anyway.
    It has no gradients."""
    from transformers import AutoConfig

    path = resolve(name_or_path, revision)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    config.use_cache = False  # with a cache, packed documents silently attend to each other
    if vocab_size is not None and vocab_size > config.vocab_size:
        config.vocab_size = (vocab_size + 7) // 8 * 8  # as open-instruct: resize to a multiple of 8
    if kind == "reward":
        config.num_labels = 1
    cls = model_class(config, kind)
    attn_implementation = attention_for(config, cls, attn_implementation)
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation=attn_implementation,
                                 dtype=DTYPES[compute_dtype] if frozen else torch.float32)
    apply_fsdp(model, compute_dtype=compute_dtype, cpu_offload=cpu_offload,
               reshard_after_forward=reshard_after_forward, activation_checkpointing=gradient_checkpointing)
    model.to_empty(device="cpu" if cpu_offload else device)
    init_buffers(model)  # before the weights: a stray parameter init would be overwritten by them
    load_weights(model, path, init_missing=init_missing, seed=seed)
    model.name_or_path = str(path)
    return model.requires_grad_(False).eval() if frozen else model


@contextlib.contextmanager
def config_value(config, name: str, value):
    """Set config.name to value for the duration, where the config has that field."""
    if not hasattr(config, name):
        yield
        return
    old = getattr(config, name)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, old)


@contextlib.contextmanager
def router_aux_loss(model: torch.nn.Module, enabled: bool = True):
    """`with router_aux_loss(model) as aux: model(...)`: every forward inside appends its MoE router's
    load-balancing loss (transformers' load_balancing_loss_func over all layers' router logits, the
    Switch Transformer loss, Fedus et al. 2021 eq. 4) to the list `aux`. The model's own forward
    computes it once asked for its router logits; our chunked LM head and pair forwards run unchanged.
    Not enabled: `aux` stays empty and nothing changes."""
    aux: list[torch.Tensor] = []
    if not enabled:
        yield aux
        return
    if not hasattr(model.config, "output_router_logits"):
        raise ValueError(f"--load_balancing_loss: {type(model).__name__} has no router (not a mixture of experts)")

    def keep(_module, _args, output):
        if getattr(output, "aux_loss", None) is None:
            raise ValueError(f"--load_balancing_loss: {type(model).__name__} returned no aux_loss")
        aux.append(output.aux_loss)

    hook = model.register_forward_hook(keep)
    try:
        with config_value(model.config, "output_router_logits", True):
            yield aux
    finally:
        hook.remove()
