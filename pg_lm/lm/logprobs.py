"""Log-probabilities of the chosen tokens and the policy's entropy, from the vocabulary logits, in one pass.

The loss needs two numbers per completion token out of a (B, T, V) block of logits (V = 49,152
for SmolLM2): ``log softmax(x)[token]`` and the entropy ``H = -sum p log p``. Written with
torch ops (``.float()``, ``gather``, ``logsumexp``, ``log_softmax`` for the entropy) the forward
and the backward each make several fresh (B, T, V) fp32 tensors -- the cast, the exponentials, the
zeros that ``gather``'s backward scatters into, the sum of the two gradients, the cast back -- and
that memory traffic, not arithmetic, is what they cost. :func:`token_logprobs_entropy` works
through the rows a chunk at a time in fp32 and writes the logits' gradient once, in the logits' own
dtype. The chunk suits the device: on a CPU a few rows, so that a chunk stays in cache; on a GPU
many (a few kernels per chunk, each over hundreds of rows), so that the loop's launches are few and
the fp32 temporaries stay bounded whatever B x T is. Same numbers as the plain ops to fp32 rounding
(tests/test_lm_logprobs.py checks values and gradients against them).

With x = logits / temperature, lse = log sum_j exp x_j and p = softmax(x):

    logp = x[token] - lse                      d logp / dx = onehot(token) - p
    H    = -sum_j p_j log p_j                  dH / dx     = -p * (log p + H)
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 20  # fp32 elements worked on at once on a CPU: 4 MB, within a core's share of the L3 cache
GPU_CHUNK_ELEMENTS = 1 << 26  # elsewhere: 256 MB of fp32 temporaries, ~430 rows of a 150k-entry vocabulary


def _rows(vocab: int, device: torch.device) -> int:
    """Rows of ``vocab`` logits per chunk on ``device``."""
    elements = CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _fp32(rows: Tensor, temperature: float) -> Tensor:
    """A fresh fp32 copy of ``rows`` / temperature, free to change in place. A masked logit (-inf)
    becomes -1e30: its p is exactly 0 and p x is 0, not NaN."""
    x = rows.to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    return x.clamp_(min=-1e30)


class _TokenLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, entropy: bool):
        N, V = logits.shape  # (N, V), tokens (N,)
        logp = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,)
        lse = torch.empty_like(logp)  # (N,)
        ent = torch.empty_like(logp)  # (N,)
        step = _rows(V, logits.device)
        for s in range(0, N, step):
            x = _fp32(logits[s : s + step], temperature)  # (n, V)
            c_lse = torch.logsumexp(x, -1)  # (n,)
            y = x.sub_(c_lse[:, None])  # (n, V) log p, in place
            logp[s : s + step] = y.gather(-1, tokens[s : s + step, None]).squeeze(-1)
            if entropy:  # else the entropies stay unset and are not returned
                ent[s : s + step] = -torch.linalg.vecdot(y.exp(), y)  # -sum p log p: terms of one sign
            lse[s : s + step] = c_lse
        ctx.temperature = temperature
        ctx.save_for_backward(logits, tokens, lse, ent)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        logits, tokens, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None
        N, V = logits.shape
        t = ctx.temperature
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V), the logits' dtype
        step = _rows(V, logits.device)
        for s in range(0, N, step):
            sl = slice(s, s + step)
            y = _fp32(logits[sl], t).sub_(lse[sl, None])  # (n, V) log p
            p = y.exp()  # (n, V)
            if g_ent is None:
                g = p.mul_(-g_logp[sl, None])  # -g p
            else:  # -p (g_logp + g_ent (x - E_p[x])), x - E_p[x] = log p + H
                coef = y.add_(ent[sl, None]).mul_(g_ent[sl, None])  # (n, V)
                if g_logp is not None:
                    coef.add_(g_logp[sl, None])
                g = p.mul_(coef).neg_()
            if g_logp is not None:
                g.scatter_add_(-1, tokens[sl, None], g_logp[sl, None].to(g.dtype))  # + g onehot(token)
            if t != 1.0:
                g.div_(t)
            grad[sl] = g
        return grad, None, None, None


def token_logprobs_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                           entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """(log softmax(logits / temperature)[tokens], entropy of softmax(logits / temperature)), both fp32.

    logits (..., V) in any float dtype, tokens (...) -> two (...) tensors. Differentiable in
    ``logits`` through both outputs; the logits' gradient comes back in their dtype. Masked
    (-inf) logits count as probability 0 (0 log 0 = 0). ``entropy=False``: the entropy is not
    computed (one exponential pass over the logits fewer) and None comes back in its place."""
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    lead, V = tokens.shape, logits.shape[-1]
    logp, ent = _TokenLogprobsEntropy.apply(logits.reshape(-1, V), tokens.reshape(-1), float(temperature),
                                            bool(entropy))
    return logp.view(lead), ent.view(lead) if entropy else None  # (...), (...)
