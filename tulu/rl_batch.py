"""RLVR plumbing between the engines and the losses: prompt data, rollout batches, scoring forwards.

Shapes: B = sequences (prompts × samples), Q = query width (left-padded), R = response width
(right-padded), L = Q + R.
"""
from __future__ import annotations

import json
import time

import torch

from tulu.chat import IGNORE_INDEX, DataError, check_messages, encode, render
from tulu.data import TokenizedData, build_dataset
from tulu.dist import broadcast_object
from tulu.fsdp import no_grad_forward
from tulu.lm_head import head_logprobs
from tulu.ops import logprobs_from_logits
from tulu.verifiers import check_ground_truth, verify_batch

INVALID_LOGPROB = 1.0  # the original's filler on padding: log-ratios there are 0, so KL is 0


def _prompt_row(tokenizer, messages_key, ground_truths_key, max_prompt_len, max_token_len, skip_bad_rows):
    def fn(row, where):
        empty = {"input_ids": [], "ground_truth": "", "source": "", "status": "bad"}
        try:
            messages = row.get(messages_key)
            if messages is None:
                raise DataError(f"{where}: missing field '{messages_key}'")
            check_messages(messages, where, messages_key)
            if ground_truths_key not in row or row[ground_truths_key] is None:
                raise DataError(f"{where}: missing field '{ground_truths_key}'")
            if row.get("dataset") is None:
                raise DataError(f"{where}: missing field 'dataset' (the verifier source: gsm8k, math, ifeval)")
            truth = row[ground_truths_key]
            try:  # here, not at step 900: an unknown source or a malformed ground truth
                check_ground_truth(row["dataset"], truth if isinstance(truth, str) else json.dumps(truth))
            except (KeyError, ValueError) as e:
                raise DataError(f"{where}: field 'dataset' / '{ground_truths_key}': {e.args[0]}") from None
        except DataError:
            if not skip_bad_rows:
                raise
            return empty
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        ids = encode(tokenizer, render(tokenizer, prompt, add_generation_prompt=True))
        full = len(encode(tokenizer, render(tokenizer, messages)))
        too_long = (max_prompt_len and len(ids) > max_prompt_len) or (max_token_len and full > max_token_len)
        return {"input_ids": ids, "ground_truth": truth if isinstance(truth, str) else json.dumps(truth),
                "source": str(row["dataset"]).lower(), "status": "dropped" if too_long else "ok"}
    return fn


def build_prompt_data(mixer: dict, tokenizer, split: str, max_prompt_token_length: int | None,
                      max_token_length: int | None, messages_key: str = "messages",
                      ground_truths_key: str = "ground_truth", skip_bad_rows: bool = False,
                      is_main: bool = True) -> TokenizedData:
    """Prompt ids (chat template + generation prompt, no BOS), ground truth and verifier source per
    row; rows over the length limits are dropped and counted, as the original filtered them
    (open-instruct combine_dataset semantics: no shuffle when mixing)."""
    fn = _prompt_row(tokenizer, messages_key, ground_truths_key, max_prompt_token_length, max_token_length,
                     skip_bad_rows)
    return build_dataset("rlvr", mixer, tokenizer, fn, [split, max_prompt_token_length, max_token_length,
                                                        messages_key, ground_truths_key, skip_bad_rows],
                         split=split, shuffle=False, is_main=is_main)


def rollout_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int,
                  response_length: int) -> dict[str, torch.Tensor]:
    """Left-padded queries + responses right-padded to response_length, in one (B, L) tensor.

    The fixed response width matters: the score sits one position after the stop token unless that
    falls off the end (the original's rule), so the width must not depend on the batch.
    seq_len follows the original: index of the last response token (n − 1)."""
    Q = max(len(q) for q in queries)
    R = response_length
    B = len(queries)
    qr = torch.full((B, Q + R), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((B, Q + R), dtype=torch.bool)  # (B, L)
    for b, (q, r) in enumerate(zip(queries, responses)):
        qr[b, Q - len(q):Q] = torch.tensor(q)
        mask[b, Q - len(q):Q] = True
        if r:
            r = r[:R]
            qr[b, Q:Q + len(r)] = torch.tensor(r)
            mask[b, Q:Q + len(r)] = True
    lengths = torch.tensor([min(len(r), R) for r in responses])  # (B,)
    return {"query_response": qr, "attention_mask": mask, "context_length": Q,
            "response_mask": mask[:, Q:], "seq_lens": (lengths - 1).clamp(min=0)}


def engine_logprobs(completions: list[tuple[list[int], list[float]]], response_length: int) -> torch.Tensor:
    """The engine's log-prob of each sampled token, (B, R) fp32, 0 past a response's end: completions
    are (token_ids, logprobs) pairs, as `generate` returns them."""
    out = torch.zeros(len(completions), response_length)  # (B, R)
    for b, (_, logprobs) in enumerate(completions):
        out[b, :len(logprobs[:response_length])] = torch.tensor(logprobs[:response_length])
    return out


def forward_inputs(batch: dict, rows, device: torch.device) -> dict:
    """Model kwargs for rows of a rollout batch: positions count real tokens only, so a left-padded
    prompt sees the rotary positions it would see alone."""
    mask = batch["attention_mask"][rows]
    ids = batch["query_response"][rows].masked_fill(~mask, 0)  # the pad id may lie outside the embedding
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device),
            "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0).to(device)}


def response_logprobs(model, batch: dict, rows, device: torch.device, temperature: float,
                      chunked: bool = False) -> torch.Tensor:
    """log π(response token) under the sampling temperature, (b, R) fp32; INVALID_LOGPROB on padding.
    The original divides logits by (temperature + 1e-7). chunked: through the LM head a chunk of
    tokens at a time (tulu.lm_head), with no logits computed for prompt or padding positions."""
    Q = batch["context_length"]
    inputs, resp_mask = forward_inputs(batch, rows, device), batch["response_mask"][rows].to(device)  # mask (b, R)
    if chunked:  # position t predicts token t + 1: the response's targets sit at positions Q-1 .. L-2
        targets = torch.full_like(inputs["input_ids"], IGNORE_INDEX)  # (b, L)
        targets[:, Q - 1:-1] = batch["query_response"][rows, Q:].to(device).masked_fill(~resp_mask, IGNORE_INDEX)
        lp = head_logprobs(model, inputs, targets, temperature + 1e-7)[0][:, Q - 1:-1]  # (b, R)
    else:
        logits = model(**inputs).logits[:, Q - 1:-1]  # (b, R, V)
        targets = batch["query_response"][rows, Q:].to(device).masked_fill(~resp_mask, 0)  # (b, R)
        lp = logprobs_from_logits(logits, targets, temperature + 1e-7)  # (b, R)
    return lp.masked_fill(~resp_mask, INVALID_LOGPROB)


def response_values(value_model, batch: dict, rows, device: torch.device) -> torch.Tensor:
    """V(state before response token t) for t < R, (b, R) fp32: the value head at positions Q−1..L−2."""
    from tulu.reward import token_scores

    Q = batch["context_length"]
    return token_scores(value_model, forward_inputs(batch, rows, device))[:, Q - 1:-1]  # (b, R)


def reward_model_scores(reward_model, batch: dict, rows, device: torch.device) -> torch.Tensor:
    """Reward-model score at each sequence's last real token, (b,)."""
    from tulu.reward import token_scores

    scores = token_scores(reward_model, forward_inputs(batch, rows, device))  # (b, L)
    mask = batch["attention_mask"][rows]
    last = (torch.arange(mask.shape[1]) * mask).argmax(-1).to(device)  # (b,)
    return scores.gather(1, last[:, None]).squeeze(1)


def score_rollouts(batch: dict, policy, ref, value, reward_model, forward_batch: int, device: torch.device,
                   temperature: float, chunked: bool = False) -> tuple:
    """The learner's no-grad forwards over a rollout batch, `forward_batch` responses at a time, every
    model resharded after (a model given as None is skipped): (π_old, π_ref) log-probs (B, R), the
    value model's V_old (B, R) and the reward model's score (B,); None for an absent model."""
    B = batch["query_response"].shape[0]
    chunks = [slice(i, i + forward_batch) for i in range(0, B, forward_batch)]
    run = lambda fn, net: torch.cat([fn(net, c) for c in chunks]) if net is not None else None  # noqa: E731
    with no_grad_forward(policy, ref, value, reward_model):
        logps = lambda net, c: response_logprobs(net, batch, c, device, temperature, chunked)  # noqa: E731
        return (run(logps, policy), run(logps, ref),
                run(lambda net, c: response_values(net, batch, c, device), value),
                run(lambda net, c: reward_model_scores(net, batch, c, device), reward_model))


def verify_rollouts(rows: list[dict], group_size: int, texts: list[str], device: torch.device) -> torch.Tensor:
    """1.0 where the verifier of each response's prompt row (its source) accepts it, (B,) on `device`;
    rows hold one prompt per group of `group_size` responses."""
    sources = [r["source"] for r in rows for _ in range(group_size)]
    truths = [r["ground_truth"] for r in rows for _ in range(group_size)]
    return torch.tensor(verify_batch(sources, texts, truths), device=device, dtype=torch.float32)


def generate(pool, prompts: list[list[int]], params) -> tuple[list, float]:
    """On rank 0 only: (token_ids, logprobs) of the n completions of each prompt, and the seconds it took."""
    t0 = time.perf_counter()
    out = pool.generate(prompts, params)
    return [[(c.token_ids, c.logprobs) for c in group] for group in out], time.perf_counter() - t0


def held_out_correct_rate(pool, d, data: TokenizedData, tokenizer, params, output_dir: str,
                          step: int) -> dict:
    """Verifiable correct rate on held-out prompts: rank 0 generates (one completion each) and
    verifies, appends 8 examples to output_dir/evals.jsonl, and broadcasts the result."""
    result = None
    if d.is_main:
        rows = [data.ds[i] for i in range(len(data))]
        groups, _ = generate(pool, [r["input_ids"] for r in rows], params)
        texts = [tokenizer.decode(g[0][0], skip_special_tokens=True) for g in groups]
        verified = verify_batch([r["source"] for r in rows], texts, [r["ground_truth"] for r in rows])
        result = {"eval/verifiable_correct_rate": sum(v > 0 for v in verified) / max(1, len(verified))}
        with open(f"{output_dir}/evals.jsonl", "a") as f:
            for row, text, v in list(zip(rows, texts, verified))[:8]:
                f.write(json.dumps({"step": step, "prompt": tokenizer.decode(row["input_ids"]), "response": text,
                                    "ground_truth": row["ground_truth"], "verified": v}) + "\n")
    return broadcast_object(result)


class EngineOutOfSync(RuntimeError):
    """An engine's log-probs differ from the trainer's after a weight sync (stale or garbled weights)."""


def engine_sync_gaps(pool, d, model, prompts: list[list[int]], params, pad_id: int, temperature: float,
                     chunked: bool = False) -> dict[str, float]:
    """Every rank: each engine samples `prompts` (rank 0 asks every engine on its own), the trainer
    scores the same tokens, and the mean |Δ log p| per sampled token is returned per engine name."""
    sampled = None
    if d.is_main:
        futures = [pool.call(e, "generate", prompts, params) for e in pool.engines]
        sampled = {e.name: out for e, out in zip(pool.engines, pool.wait(futures, what="sync check"))}
    sampled = broadcast_object({n: [[(c.token_ids, c.logprobs) for c in g] for g in out]
                                for n, out in sampled.items()} if d.is_main else None)
    gaps = {}
    for name, groups in sampled.items():
        responses = [g[0][0] for g in groups]
        engine = engine_logprobs([g[0] for g in groups], params.max_tokens)  # (B, R)
        batch = rollout_batch(prompts, responses, pad_id, params.max_tokens)
        with no_grad_forward(model):  # a graph left behind would hold FSDP's unsharded params into the next step
            mine = response_logprobs(model, batch, slice(None), d.device, temperature, chunked).cpu()  # (B, R)
        mask = batch["response_mask"]
        gaps[name] = float(((mine - engine).abs() * mask).sum() / mask.sum().clamp(min=1))
    return gaps


def check_engines_in_sync(gaps: dict[str, float], tol: float, step: int) -> None:
    """Fail fast, naming the engines, the gap and the step, when any engine is out of tolerance."""
    bad = {name: round(gap, 6) for name, gap in gaps.items() if gap > tol}
    if bad:
        raise EngineOutOfSync(f"sync check after the weight sync of step {step}: mean |Δ log p| per token between "
                              f"the trainer and {bad} exceeds --sync_check_tol {tol} (stale or garbled weights in "
                              f"those engines; a matched engine measures ~1e-6 in fp32)")
