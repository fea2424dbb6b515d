"""Low precision (bf16 / fp16) on the CPU: when to use it, an attention kernel for it, a sampling copy.

* :func:`cpu_bf16_is_fast` times one matmul in both precisions: the CPU feature flags do not
  tell (with AVX512-BF16 a CPU may run bf16 matmuls several times faster than fp32, or slower;
  without it bf16 is emulated, ~80x slower).
* :func:`grouped_attention` is the model's attention as two batched matmuls with the query
  heads of a key/value head grouped (no repeated K/V) and the softmax in fp32: on a CPU in bf16
  at an RL step's small shapes, several times faster than transformers' SDPA path for a training
  forward and backward (``benchmarks/attention_cpu.py``). Registered with transformers'
  ``AttentionInterface`` as ``"pg_lm_grouped"``.
* :class:`SamplerCopy`: the policy's LM with its parameters in bf16 / fp16 (buffers, such as
  rotary frequencies, stay fp32), refreshed at the end of each update. Sampling from it runs
  pure low-precision matmuls instead of autocast's casts of every activation (and, under
  LoRA, of every frozen weight at every decode step).
"""

from __future__ import annotations

import copy
import functools
import time

import torch
from torch import Tensor, nn

ATTENTION_NAME = "pg_lm_grouped"


def _matmul_seconds(a: Tensor, b: Tensor) -> float:
    t0 = time.perf_counter()
    a @ b
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast(size: int = 512, repeats: int = 5) -> bool:
    """Whether a (size, 2 size) @ (2 size, 2 size) bf16 matmul on this CPU takes under 0.6 of the
    fp32 one: the best of ``repeats`` fp32 products against up to ``repeats`` bf16 ones, the first
    under the limit deciding. Cached for the process.

    Where bf16 is emulated one product takes about a second, so the probe stops at the first
    bf16 product that is over 20x the fp32 one, before any warm-up (kernel selection costs
    less), or at the first timed one over 4x the limit."""
    def operands(dtype):
        return torch.randn(size, 2 * size, dtype=dtype), torch.randn(2 * size, 2 * size, dtype=dtype)

    a, b = operands(torch.float32)
    _matmul_seconds(a, b)  # warm-up: kernel selection, page faults
    fp32 = min(_matmul_seconds(a, b) for _ in range(repeats))
    a, b = operands(torch.bfloat16)
    if _matmul_seconds(a, b) > 20 * fp32:  # the cold first product, warm-up included
        return False
    for _ in range(repeats):
        t = _matmul_seconds(a, b)
        if t < 0.6 * fp32:
            return True
        if t > 4 * 0.6 * fp32:
            return False
    return False


def grouped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **_) -> tuple[Tensor, None]:
    """softmax(q kᵀ · scaling + mask) v for grouped-query attention; transformers' attention interface.

    query (B, H, Tq, D); key, value (B, KV, L, D) with H = KV x G (head h uses K/V head h // G);
    ``attention_mask``: bool (B or 1, 1, Tq, L), True where a query may attend, or None for
    causal (the last Tq of L positions). Returns ((B, Tq, H, D), None). Scores and softmax in
    fp32; fully masked rows (left-padding queries) get uniform weights, as in eager attention.
    """
    B, H, Tq, D = query.shape
    KV, L = key.shape[1], key.shape[2]
    G = H // KV
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.reshape(B, KV, G * Tq, D)  # the G query heads of a K/V head, stacked along time
    scores = torch.matmul(q, key.transpose(-1, -2)).view(B, KV, G, Tq, L).float() * scaling  # (B, KV, G, Tq, L)
    if attention_mask is None and Tq > 1:
        attention_mask = torch.ones(Tq, L, dtype=torch.bool, device=query.device).tril(L - Tq)
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:  # an additive float mask
            scores = scores + attention_mask.float().unsqueeze(2 if attention_mask.dim() == 4 else 0)
        else:
            m = attention_mask.unsqueeze(2) if attention_mask.dim() == 4 else attention_mask  # (B, 1, 1, Tq, L)
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1).to(value.dtype).view(B, KV, G * Tq, L)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, dropout)
    out = torch.matmul(probs, value).view(B, H, Tq, D)  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(lm: nn.Module) -> bool:
    """Switch a transformers model (or a PEFT model around one) from SDPA to :func:`grouped_attention`.
    Returns False, changing nothing, where the model does not use SDPA through the attention interface."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if getattr(base.config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    AttentionInterface.register(ATTENTION_NAME, grouped_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the boolean masks SDPA gets
    try:
        base.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, TypeError, AttributeError):  # a model that accepts only its known kernels
        return False
    return base.config._attn_implementation == ATTENTION_NAME


class _FromCopy(torch.autograd.Function):
    """``low``, a copy of ``master`` in low precision, with ``master``'s gradient: what autocast's cast
    of ``master`` computes (the same rounding), without casting it again."""

    @staticmethod
    def forward(ctx, master: Tensor, low: Tensor) -> Tensor:
        ctx.master_dtype = master.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.master_dtype), None


class SamplerCopy:
    """A copy of ``lm`` with its floating-point parameters in ``dtype``, for sampling.

    :meth:`refresh` copies the trainable parameters (the frozen ones do not change) from
    ``lm``; the trainer calls it at the end of every update. Costs ``dtype``'s bytes per
    parameter of memory and one cast of the trainable weights per step.

    While the copy is current (``current``: the trainer sets it False after each optimizer step, and
    :meth:`refresh` back to True), the update's forward can take its linear weights from it
    (:meth:`linear_weights`) instead of autocast casting every fp32 weight again: the same values, the
    same gradient. (A flag, not the weights' version counters: the fused AdamW step leaves those unchanged.)
    """

    def __init__(self, lm: nn.Module, dtype: torch.dtype):
        self.src = lm
        self.lm = copy.deepcopy(lm).eval()
        self.lm.requires_grad_(False)
        for p in self.lm.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        self.pairs = [(d, s) for d, s in zip(self.lm.parameters(), lm.parameters()) if s.requires_grad]
        owners: dict[int, int] = {}
        for m in lm.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        # (copy, learner) weights of nn.Linear layers; a weight tied to another module (an embedding
        # shared with the output layer) is left out: the embedding must stay in the learner's precision
        self.linear = [(d.weight, s.weight) for d, s in zip(self.lm.modules(), lm.modules())
                       if type(s) is nn.Linear and owners[id(s.weight)] == 1]
        self.current = True

    @torch.no_grad()
    def refresh(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src)
        self.current = True

    def linear_weights(self, names: dict[int, str]) -> dict[str, Tensor]:
        """{name: low-precision weight} for the learner's linear weights, named by ``names`` (id of a
        learner parameter -> its name in the module to be called), or {} when the copy is stale. A
        trainable weight comes with its gradient to the learner's weight (:class:`_FromCopy`)."""
        if not self.current:
            return {}
        return {names[id(s)]: _FromCopy.apply(s, d) if s.requires_grad else d
                for d, s in self.linear if id(s) in names}
