"""Masked reductions that say what they divide by.

Shape glossary (used across pg_lm): B sequences or environments, T time steps or
completion tokens, P prompt tokens, G samples per prompt, V vocabulary.
A ``mask`` is a float or bool tensor broadcastable to ``x``; 1 marks a real step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is 1 (no division); masked inf/NaN are ignored."""
    xm = torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * mask
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` divided by the number of unmasked positions, ``sum(mask)``.

    An all-zero mask gives 0, not NaN (the denominator is clamped to 1).
    """
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over unmasked positions; divides by ``n - 1`` (``unbiased``) or ``n``."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = mask.sum()
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased and n > 1 else n
    return sq / denom.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over unmasked positions; masked positions become 0.

    With ``shift_mean=False`` the mean is added back (scale only), as in TRL/OpenRLHF.
    ``reduce``: a function that sums a tensor over every process holding a part of the batch
    (e.g. ``lambda t: accelerator.reduce(t, "sum")``); the mean and the (unbiased) variance are
    then those of the *global* batch, in two passes (sum and count, then the squared deviations),
    so a batch split over processes is whitened exactly as it would be whole (REINFORCE++, Hu 2025:
    advantages normalised over the global batch). None: this tensor alone.
    """
    reduce = reduce or (lambda t: t)
    mask = mask.to(x.dtype)
    s, n = reduce(torch.stack([masked_sum(x, mask), masked_sum(torch.ones_like(x), mask)]))  # (2,) -> 2 x ()
    mean = s / n.clamp(min=1.0)
    sq = reduce(masked_sum((x - mean) ** 2, mask).reshape(1))[0]
    var = sq / (n - 1 if n > 1 else n).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask
