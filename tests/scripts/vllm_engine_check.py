"""VLLMEngine against transformers on a model folder (an HF export), one engine start, fp32:

1. greedy completions equal transformers' greedy `generate`;
2. sampled tokens' log-probs (temperature 0.7, n = 3) equal a transformers forward's;
3. seeds: completion j of prompt i depends only on (seed, i, j); identical prompts in one batch get
   distinct completions (per-prompt seed + i beside vLLM's per-sample seed + j would repeat them);
   the same limits as TorchEngine (greedy with n > 1 is refused before any request);
4. direct `load_weights` (through a safetensors file) of perturbed weights: the engine then matches
   transformers with those weights, on the prompts it cached before (so the prefix cache was reset);
5. `shutdown()` leaves no process behind.

Prints one JSON line and VLLM_ENGINE_OK; tests/test_vllm.py asserts on it.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    from tulu.ops import logprobs_from_logits

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[:, len(prompt) - 1 : -1]  # (1, T, V)
    return logprobs_from_logits(logits, torch.tensor([tokens]), temperature)[0]  # (T,)


def max_diff(model, prompts, groups, temperature) -> float:
    return max((hf_logprobs(model, p, c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max().item()
               for p, g in zip(prompts, groups) for c in g)


def children() -> list[int]:
    import psutil

    return [c.name() for c in psutil.Process().children(recursive=True)
            if c.status() != psutil.STATUS_ZOMBIE and c.name().startswith("VLLM::")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.engine import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    res = {}
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for a, b in [(1, 2), (3, 4), (5, 1), (2, 2),
                                                                                   (7, 1), (0, 9), (4, 4), (6, 3)]]
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    engine = VLLMEngine(args.model, dtype="float32", enforce_eager=True, kv_cache_gib=0.25)  # fp32 on GPU too
    res["start_s"] = time.perf_counter() - t0
    res["children"] = children()

    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=()))
    want = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, min_new_tokens=8)
        want.append(out[0, len(prompt):].tolist())
    res["greedy_equal"] = sum(g[0].token_ids == w for g, w in zip(greedy, want))
    res["greedy_logprob_diff"] = max_diff(hf, prompts, greedy, 1.0)  # greedy reports temperature-1 log-probs

    sp = SamplingParams(n=3, temperature=0.7, max_tokens=12, seed=11, stop_token_ids=())
    sampled = engine.generate(prompts, sp)
    res["sampled_logprob_diff"] = max_diff(hf, prompts, sampled, 0.7)
    same = [[2, 40, 41, 42]] * 3  # not a chat: the model's answers there are near-certain
    repeated = [tuple(c.token_ids) for g in engine.generate(same, SamplingParams(n=3, temperature=2.0, max_tokens=24, seed=5,
                                                                                 stop_token_ids=())) for c in g]
    res["distinct_of_9"] = len(set(repeated))
    # The scheme this replaced, straight through vLLM: per-prompt seeds seed + i with n samples each.
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    old = engine.llm.generate([TokensPrompt(prompt_token_ids=same[0])] * 2,
                              [VSP(n=2, temperature=2.0, max_tokens=24, seed=5 + i, ignore_eos=True) for i in range(2)],
                              use_tqdm=False)
    res["old_scheme_collides"] = list(old[0].outputs[1].token_ids) == list(old[1].outputs[0].token_ids)
    again = engine.generate(prompts, sp)
    res["reproducible"] = [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in sampled]
    alone = engine.generate([prompts[2]], SamplingParams(n=3, temperature=0.7, max_tokens=12, seed=13,
                                                         stop_token_ids=()))
    res["batch_independent"] = [c.token_ids for c in alone[0]] == [c.token_ids for c in sampled[2]]
    try:
        SamplingParams(n=2, temperature=0.0)
        res["greedy_n2_refused"] = False
    except ValueError:
        res["greedy_n2_refused"] = True

    g = torch.Generator().manual_seed(0)
    perturbed = {n: (t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in hf.state_dict().items()}
    hf.load_state_dict(perturbed)
    engine.load_weights(perturbed.items(), version=7)
    after = engine.generate(prompts, sp)
    res["version_after_load"] = sorted({c.version for g in after for c in g})
    res["moved"] = any(a.token_ids != b.token_ids for ga, gb in zip(sampled, after) for a, b in zip(ga, gb))
    res["loaded_logprob_diff"] = max_diff(hf, prompts, after, 0.7)

    engine.shutdown()
    time.sleep(1.0)
    res["children_after_shutdown"] = children()
    print(json.dumps(res))
    print("VLLM_ENGINE_OK")


if __name__ == "__main__":
    main()
