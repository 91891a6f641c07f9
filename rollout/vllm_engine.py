"""VLLMEngine: the `Engine` protocol over vLLM (GPU only; `vllm` is imported lazily).

Supported: vllm >= 0.10.2, < 0.34 (written against 0.33.0's API: `LLM(worker_extension_cls=...)`,
`LLM.collective_rpc`, `logprobs_mode`; the first two exist since 0.8.x, logprobs_mode since 0.10.2).
vLLM pins its own torch and transformers (0.33.0: torch==2.14.0 CUDA, transformers<5.21), so it runs
from its own environment: `pip install "vllm>=0.10.2,<0.34"` in a venv next to the trainer's and
point the pool's engines at it, or run `python -m rollout.serve` from that venv on the engine nodes.

How it maps onto vLLM:
- one `vllm.LLM` per engine process, with tensor parallelism (`tensor_parallel_size`) and prefix
  caching; each TP worker is one rank of the weight-sync group (rank_offset + its TP rank) and
  receives the FULL tensors, which vLLM's `model.load_weights` stacks (q/k/v -> qkv_proj,
  gate/up -> gate_up_proj) and shards for its TP rank;
- the worker side is `WorkerExtension`, mixed into vLLM's worker class through
  `worker_extension_cls`; the engine process drives it with `collective_rpc`;
- after every sync the prefix cache is reset: cached KV blocks computed by old weights would
  otherwise be reused, i.e. the engine would silently keep generating with stale weights;
- log-probs: `logprobs_mode="processed_logprobs"` and `logprobs=0`, i.e. the sampled token's log-prob
  after temperature. With top_p = 1 (the Tulu 3 setting) this equals TorchEngine's and the trainer's
  value. With top_p < 1, vLLM's processed log-probs are taken after the top_p cut (renormalized over
  the nucleus), unlike TorchEngine's, which are before it. Greedy (temperature 0) reports log-probs
  at temperature 1 in both.
- seeds: prompt i gets `seed + i` (its n samples come from that request's generator), so a fixed
  seed reproduces a batch; vLLM's random streams differ from TorchEngine's.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from rollout.engine import Completion, SamplingParams, model_eos_ids, stop_set


class WorkerExtension:
    """Methods added to every vLLM worker (`self` is the worker: self.model_runner, self.device, self.rank)."""

    def tulu_init_sync(self, host: str, port: int, rank_offset: int, world: int, backend: str, timeout_s: float,
                       local_host: str | None = None) -> None:
        from rollout.weight_sync import WeightReceiver

        device = self.device if backend == "nccl" else "cpu"
        # Fresh buffers: a vLLM model's load_weights may hold on to the tensors it is given.
        self.tulu_receiver = WeightReceiver(host, port, rank_offset + self.rank, world, backend, device, timeout_s,
                                            local_host, reuse_buffers=False)

    def tulu_receive_weights(self) -> dict:
        t0 = time.perf_counter()
        version, weights = self.tulu_receiver.receive()
        try:
            self.model_runner.model.load_weights(weights=weights)
        finally:
            for _ in weights:  # a failed load still takes every bucket, so the trainer never hangs
                pass
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        r = self.tulu_receiver
        return {"version": version, "recv_s": r.last_recv_s, "load_s": total - r.last_recv_s,
                "recv_bytes": r.last_bytes, "recv_dtypes": r.last_dtypes}

    def tulu_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=weights)

    def tulu_close_sync(self) -> None:
        if getattr(self, "tulu_receiver", None) is not None:
            self.tulu_receiver.close()
            self.tulu_receiver = None


class VLLMEngine:
    def __init__(self, model_path: str, tensor_parallel_size: int = 1, dtype: str = "bfloat16", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False):
        from vllm import LLM

        from tulu.model import resolve

        self.llm = LLM(model=str(resolve(model_path)), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                       seed=seed, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                       worker_extension_cls="rollout.vllm_engine.WorkerExtension",
                       logprobs_mode="processed_logprobs", trust_remote_code=False)
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(str(resolve(model_path)))
        except OSError:  # no generation_config.json
            gen = None
        self.eos_ids = model_eos_ids(self.llm.llm_engine.model_config.hf_config, gen)  # TorchEngine's rule
        self.version = 0

    def _vllm_params(self, params: SamplingParams, index: int):
        from vllm import SamplingParams as VSP

        # TorchEngine's stop set, spelled out: ignore_eos=True turns off vLLM's own EOS rule (the
        # tokenizer's EOS + generation_config's), so exactly these ids end a completion in both engines.
        return VSP(n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                   seed=None if params.seed is None else params.seed + index, logprobs=0, detokenize=False,
                   stop_token_ids=sorted(stop_set(params, self.eos_ids)), ignore_eos=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 [self._vllm_params(params, i) for i in range(len(prompts))], use_tqdm=False)
        result = []
        for out in outs:  # vLLM returns outputs in prompt order
            group = []
            for o in out.outputs:
                toks = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs, toks)]
                reason = "stop" if o.finish_reason == "stop" else "length"
                group.append(Completion(toks, lps, reason, self.version))
            result.append(group)
        return result

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Direct load (not the sync path): the tensors are pickled to every worker."""
        self.llm.collective_rpc("tulu_load_weights", args=([(n, t.cpu()) for n, t in weights],))
        self.llm.reset_prefix_cache()
        self.version = self.version + 1 if version is None else version

    def init_sync(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                  local_host: str | None = None) -> dict:
        """Join the weight-sync group; reply with the engine's dtype (bf16 by default), which the trainer sends."""
        self.llm.collective_rpc("tulu_init_sync", args=(host, port, rank, world, backend, timeout_s, local_host))
        return {"dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")}

    def receive_weights(self) -> dict:
        replies = self.llm.collective_rpc("tulu_receive_weights")
        self.llm.reset_prefix_cache()  # KV blocks of the old weights must not be reused
        self.version = replies[0]["version"]
        return {"version": self.version, "recv_s": max(r["recv_s"] for r in replies),
                "load_s": max(r["load_s"] for r in replies), "recv_bytes": replies[0]["recv_bytes"],
                "recv_dtypes": replies[0]["recv_dtypes"]}  # every TP worker receives the full tensors

    def close_sync(self) -> None:
        self.llm.collective_rpc("tulu_close_sync")
