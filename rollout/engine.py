"""The rollout `Engine` protocol and `TorchEngine`, a pure-PyTorch engine (the CPU and test engine).

An engine turns prompt token ids into sampled completions with the log-prob of every sampled token,
and takes new weights from the trainer:

    engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=256, seed=1))
        -> list[list[Completion]]   # one inner list of n completions per prompt, in prompt order
    engine.load_weights(iterable of (name, tensor), version)   # then engine.version == version

Log-prob convention (the one the trainer recomputes with `tulu.ops.logprobs_from_logits`):
- `Completion.logprobs[t]` = log softmax(logits_t / temperature)[token_t], over the FULL vocabulary,
  i.e. *after* temperature and *before* top_p filtering. With top_p = 1 (the Tulu 3 setting) this is
  exactly the sampling distribution; with top_p < 1 it is the distribution top_p was cut from.
- temperature = 0 means greedy (argmax); the reported log-probs are then at temperature 1.

Seeding: with `seed` set, completion j of prompt i draws from its own generator seeded with
`row_seed(seed, i, j)` (both engines), so a prompt's samples do not depend on what else is in the
batch (the pool shifts `seed` by a chunk's first prompt index, so the split across engines does not
change the seeds), and no two (prompt, sample) pairs share a seed while n < SEED_STRIDE.

Limits (`SamplingParams` checks them, the same for both engines: vLLM's): temperature in [0, 2],
greedy only with n = 1, top_p in (0, 1], max_tokens >= 1.

`TorchEngine` is also the readable reference of what vLLM computes: left-padded batch, one prefill
forward, then one token per step through the KV cache.
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rollout.receiver import WeightReceiver, receive_and_load
from tulu.layouts import Layout

SEED_STRIDE = 1_000_003  # completions per prompt stay below this, so (prompt, sample) seeds never collide


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    max_tokens: int = 16  # new tokens per completion
    stop_token_ids: tuple[int, ...] | None = None  # None = the model's EOS id(s); () = never stop early
    stop_at_eos: bool = False  # also stop at the model's EOS id(s) when stop_token_ids is given (vLLM's default)
    seed: int | None = None  # None = fresh randomness each call

    def __post_init__(self):
        """One set of limits for both engines (vLLM's): a bad value fails here, with the same message."""
        problems = []
        if not (isinstance(self.n, int) and 1 <= self.n < SEED_STRIDE):
            problems.append(f"n must be an integer in [1, {SEED_STRIDE}), got {self.n!r}")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2] (0 = greedy), got {self.temperature!r}")
        elif self.temperature == 0 and self.n != 1:
            problems.append(f"greedy sampling (temperature 0) gives one completion: n must be 1, got {self.n}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens; a stop token that ended the completion is included
    logprobs: list[float]  # one per token, see the module docstring for the convention
    finish_reason: str  # "stop" (hit a stop token or, with stop_at_eos, EOS) or "length" (hit max_tokens)
    version: int = 0  # weight version of the engine that produced it (the trainer's step at the last sync)


class Engine(Protocol):
    version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None: ...

    # The weight-sync endpoints the serve loop calls (rollout/weight_sync.py has the protocol, rollout/receiver.py this side).
    def init_sync(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                  local_host: str | None = None) -> dict: ...  # {"dtype": the dtype its weights are held in}

    def receive_weights(self) -> dict: ...  # version, timings, and the bytes and dtypes received

    def close_sync(self) -> None: ...

    def shutdown(self) -> None: ...  # stop any process the engine started (the serve loop calls it last)


def model_eos_ids(config, generation_config=None) -> tuple[int, ...]:
    """The model's EOS id(s): generation_config's (what HF generate and vLLM stop at), else config's."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def stop_set(params: SamplingParams, eos_ids: Sequence[int]) -> set[int]:
    """The token ids that end a completion; both engines use this one rule (see SamplingParams)."""
    stop = set(eos_ids if params.stop_token_ids is None else params.stop_token_ids)
    return stop | set(eos_ids) if params.stop_at_eos else stop


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generator seed of completion `sample_index` of prompt `prompt_index` (both engines)."""
    return ((seed + prompt_index) * SEED_STRIDE + sample_index) % (2**63 - 1)


def row_generators(seed: int, rows: Sequence[tuple[int, int]], device: torch.device) -> list[torch.Generator]:
    """One generator per (prompt, sample) row, on the device the probabilities live on: torch.multinomial
    refuses a CPU generator for CUDA probabilities ("Expected a 'cuda' device type for generator")."""
    return [torch.Generator(device=device).manual_seed(row_seed(seed, i, j)) for i, j in rows]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p. probs: (B, V)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # (B, V) mass before this token already enough
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)  # (B, V), unnormalized


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step. logits: (B, V) fp32 -> (tokens (B,), their log-probs (B,))."""
    if params.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)  # (B, V) at temperature 1, by convention
        tokens = logp.argmax(-1)  # (B,)
    else:
        logp = torch.log_softmax(logits / params.temperature, dim=-1)  # (B, V)
        probs = logp.exp()
        if params.top_p < 1.0:
            probs = top_p_filter(probs, params.top_p)
        # One generator per row: a row's draws depend only on its own seed.
        tokens = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)  # (B,), (B,)


class TorchEngine:
    """A Hugging Face causal LM run by hand: batched sampling with a KV cache, per-token log-probs."""

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "fp32", threads: int | None = None,
                 max_batch_rows: int = 64):
        from transformers import AutoConfig, AutoModelForCausalLM

        from tulu.model import attention_for, resolve

        if threads:
            torch.set_num_threads(threads)
        path = resolve(model_path)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.device = torch.device(device)
        # the trainer's attention rule (tulu.model.attention_for): eager where sdpa would skip soft-capping
        config = AutoConfig.from_pretrained(path)
        attn = attention_for(config, AutoModelForCausalLM._model_mapping[type(config)], "sdpa")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
        self.model.to(self.device).eval()
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.eos_ids = model_eos_ids(cfg, getattr(self.model, "generation_config", None))
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (self.eos_ids or (0,))[0]
        self.pad_id = int(pad)
        self.max_batch_rows = max_batch_rows
        # transformers >= 5.24 names the KV cache `cache` (`past_key_values` before, now deprecated).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.version = 0
        self._receiver = None

    # -- generation --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """n completions per prompt, in prompt order; rows are decoded max_batch_rows at a time."""
        base = params.seed if params.seed is not None else random.SystemRandom().randrange(2**62)
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        done: list[Completion] = []
        for lo in range(0, len(rows), self.max_batch_rows):
            chunk = rows[lo : lo + self.max_batch_rows]
            gens = row_generators(base, chunk, self.device)
            done += self._decode([list(prompts[i]) for i, _ in chunk], params, gens)
        return [done[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], params: SamplingParams,
                gens: list[torch.Generator]) -> list[Completion]:
        """Left-pad, prefill once, then sample one token per step through the KV cache."""
        stop = stop_set(params, self.eos_ids)
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((B, P), dtype=torch.long)  # (B, P)
        for b, p in enumerate(prompts):
            ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, P - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P) positions restart after the padding
        out = [Completion([], [], "length", self.version) for _ in range(B)]
        finished = [False] * B
        inp, cache = ids, None
        for _ in range(params.max_tokens):
            res = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
            cache = res[self._cache_kw]
            tokens, logps = sample_next(res.logits[:, -1].float(), params, gens)  # (B,), (B,)
            for b, (t, lp) in enumerate(zip(tokens.tolist(), logps.tolist())):
                if finished[b]:
                    continue
                out[b].token_ids.append(t)
                out[b].logprobs.append(lp)
                if t in stop:
                    finished[b], out[b].finish_reason = True, "stop"
            if all(finished):
                break
            inp = tokens[:, None]  # (B, 1) finished rows keep decoding; their tokens are dropped
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)  # (B, P + t)
            pos = pos[:, -1:] + 1  # (B, 1)
        return out

    # -- weights -----------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Copy every named parameter in (casting dtype); all parameters must be covered, so an
        engine never keeps a silently stale tensor. version=None bumps the version by one. Weights
        come in the checkpoint layout (what the trainer sends, and vLLM loads): tensors of a
        parameter the model keeps fused (an MoE layer's experts) are assembled first (tulu/layouts.py)."""
        params = dict(self.model.named_parameters())
        seen = set()
        for name, tensor in Layout(self.model).from_checkpoint(weights, params):
            if name not in params:
                raise KeyError(f"load_weights: unknown parameter {name!r}")
            params[name].copy_(tensor)
            seen.add(name)
        if seen != set(params):
            raise KeyError(f"load_weights: parameters not updated: {sorted(set(params) - seen)[:5]}...")
        self.version = self.version + 1 if version is None else version

    def init_sync(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                  local_host: str | None = None) -> dict:
        """Join the weight-sync group; reply with the dtype this engine holds, which the trainer sends."""
        self._receiver = WeightReceiver(host, port, rank, world, backend, self.device, timeout_s, local_host)
        return {"dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}

    def receive_weights(self) -> dict:
        """Receive one sync (rollout/receiver.py) and load it; returns version and timings."""
        return receive_and_load(self._receiver, self.load_weights)

    def close_sync(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def shutdown(self) -> None:
        """Nothing runs beside this process (vLLM's engine has processes of its own to stop)."""
