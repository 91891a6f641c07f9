"""Token log-probs through the LM head without ever holding the (N, V) logits.

A Llama-3-sized vocabulary (128,256) makes the logits the largest transient of a step: one 4,096-token
row is 1.05 GB in bf16, and the fp32 copy a cross-entropy makes doubles that, its gradient again.
`chunked_logprobs` computes, chunk by chunk over tokens, log softmax(h·Wᵀ / T)[target] (and, when
asked, the entropy) with fp32 accumulation, and recomputes each chunk's logits in backward: the most
it ever holds is two fp32 (chunk, V) blocks (plus the compute-dtype logits of one chunk under bf16). The same idea as
torchtune's chunked cross-entropy and Liger's fused linear cross-entropy, written in plain torch.

`head_logprobs(model, inputs, targets)` runs it inside the model's own LM head forward, so FSDP2 has
gathered the head's weight (its own unit when untied, the root's when tied) and reduce-scatters its
gradient as for any other forward.

Gradients (z = h·Wᵀ / T, p = softmax(z), y the target; per token, g and e the incoming gradients of
log p_y and of the entropy H = −Σ p log p):
    ∂/∂z = g·(onehot(y) − p) − e·p·(log p + H);   ∂h = (∂/∂z)·W / T;   ∂W = (∂/∂z)ᵀ·h / T.
"""
from __future__ import annotations

import contextlib

import torch

from tulu.chat import IGNORE_INDEX
from tulu.model import config_value

DEFAULT_CHUNK = 512  # tokens per block: one (512, 128256) fp32 block is 0.26 GB; a 4,096-token row's logits 2.1 GB


def _chunk_logp(h: torch.Tensor, weight: torch.Tensor, inv_t: float, cap: float | None) -> torch.Tensor:
    """fp32 log-softmax of one chunk's logits, (n, V), computed in place in a single (n, V) buffer.
    cap: Gemma 2's final-logit soft-capping, cap·tanh(z / cap), applied before the temperature."""
    z = (h @ weight.t()).float()  # (n, V): the compute-dtype logits, upcast (a no-op copy in fp32)
    if cap:
        z.div_(cap).tanh_().mul_(cap)
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))


class _ChunkedLogprobs(torch.autograd.Function):
    """Over the K positions that predict a token: targets (K,) are all valid (chunked_logprobs drops
    the ignored ones before it gets here)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy, cap):
        inv_t = 1.0 / temperature
        n = hidden.shape[0]
        out = hidden.new_zeros(n, dtype=torch.float32)  # (N,)
        ent = hidden.new_zeros(n if with_entropy else 0, dtype=torch.float32)  # (N,) or (0,)
        for lo in range(0, n, chunk):
            logp = _chunk_logp(hidden[lo:lo + chunk], weight, inv_t, cap)  # (n, V)
            out[lo:lo + chunk] = logp.gather(-1, targets[lo:lo + chunk, None]).squeeze(-1)
            if with_entropy:
                ent[lo:lo + chunk] = -(logp.exp() * logp).sum(-1)
            del logp
        ctx.save_for_backward(hidden, weight, targets)
        ctx.inv_t, ctx.chunk, ctx.with_entropy, ctx.cap = inv_t, chunk, with_entropy, cap
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        hidden, weight, targets = ctx.saved_tensors
        inv_t, chunk, cap = ctx.inv_t, ctx.chunk, ctx.cap
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        entropy_grad = ctx.with_entropy and grad_ent is not None
        for lo in range(0, hidden.shape[0], chunk):
            h, y, g = hidden[lo:lo + chunk], targets[lo:lo + chunk], grad_out[lo:lo + chunk, None]  # g (n, 1)
            logp = _chunk_logp(h, weight, inv_t, cap)  # (n, V)
            p = logp.exp()  # (n, V)
            if entropy_grad:  # dz = p·(−g − e·(log p + H)), formed in logp's buffer, then p's
                H = -(p * logp).sum(-1, keepdim=True)  # (n, 1)
                p.mul_(logp.add_(H).mul_(-grad_ent[lo:lo + chunk, None]).sub_(g))
            else:
                p.mul_(-g)  # dz = −g·p
            del logp
            dz = p.scatter_add_(-1, y[:, None], g)  # + g·onehot(y)
            if inv_t != 1.0:
                dz.mul_(inv_t)
            if cap:  # through cap·tanh(z / cap): times 1 − tanh², recomputed from the raw logits
                dz.mul_(1 - ((h @ weight.t()).float() / cap).tanh_().square_())
            if grad_h is not None:
                grad_h[lo:lo + chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h.float())  # fp32 accumulation over chunks
            del p, dz
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                     chunk: int = DEFAULT_CHUNK, with_entropy: bool = False, softcap: float | None = None):
    """log softmax(hidden·weightᵀ / temperature)[targets] per token, in fp32 (with softcap: of
    softcap·tanh(hidden·weightᵀ / softcap) / temperature, Gemma 2's final-logit soft-capping).

    hidden: (..., H); weight: (V, H); targets: (...) int64, negative = ignored: log-prob 0 (and entropy
    0), no gradient, and no logits computed there at all (prompts, padding).
    Returns log-probs shaped like targets, and the entropy there too when with_entropy (else None).
    """
    flat_t = targets.reshape(-1)  # (N,)
    keep = (flat_t >= 0).nonzero().squeeze(1)  # (K,) the positions that predict a token
    lp_k, ent_k = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), weight,
                                         flat_t[keep], float(temperature), int(chunk), bool(with_entropy),
                                         float(softcap) if softcap else None)
    zeros = hidden.new_zeros(flat_t.shape[0], dtype=torch.float32)  # (N,)
    lp = zeros.index_copy(0, keep, lp_k).view(targets.shape)
    return lp, (zeros.index_copy(0, keep, ent_k).view(targets.shape) if with_entropy else None)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets aligned with positions: targets[:, t] = labels[:, t + 1], and the
    last position, which predicts nothing, is ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@contextlib.contextmanager
def _head_computes(head: torch.nn.Module, fn):
    """Make `head`'s forward return fn(hidden, head.weight) for the duration (hooks still run)."""
    head.forward = lambda hidden: fn(hidden, head.weight)
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def head_logprobs(model, inputs: dict, targets: torch.Tensor, temperature: float = 1.0,
                  chunk: int = DEFAULT_CHUNK, with_entropy: bool = False):
    """The model's forward with chunked log-probs in place of its logits.

    targets: (B, T) aligned with the model's positions (targets[:, t] is the token after position t;
    negative = ignored). Returns ((B, T) fp32 log-probs, (B, T) entropy or None). The model's own
    `lm_head` forward runs (so FSDP2 gathers it), but it never builds the (B, T, V) logits.
    """
    head = model.get_output_embeddings()
    extra = {}
    if getattr(head, "bias", None) is not None:
        raise ValueError("chunked_lm_head: an LM head with a bias is not supported")
    for name in ("logit_scale", "logits_scaling"):  # applied after the head
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"chunked_lm_head: {type(model).__name__} transforms its logits after the head "
                             f"(config.{name}); run it with --chunked_lm_head false")
    # Gemma 2 soft-caps its logits after the head: we cap inside the chunks instead, so the model's
    # forward must not cap what our head returns (log-probs) a second time.
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def fn(hidden, weight):
        lp, ent = chunked_logprobs(hidden, weight, targets, temperature, chunk, with_entropy, softcap)
        extra["entropy"] = ent
        return lp

    with _head_computes(head, fn), config_value(model.config, "final_logit_softcapping", None):
        lp = model(**inputs).logits  # (B, T): what our head returned
    return lp, extra["entropy"]
