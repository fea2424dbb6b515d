"""Masked reductions that say what they divide by.

Shape glossary (used across pg_lm): B sequences or environments, T time steps or
completion tokens, P prompt tokens, G samples per prompt, V vocabulary.
A ``mask`` is a float or bool tensor broadcastable to ``x``; 1 marks a real step.
"""

from __future__ import annotations

import math

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


def _local(t: Tensor, op: str) -> Tensor:
    """The ``reduce`` of one process: ``t`` itself."""
    return t


def _normalised(x: Tensor, mask: Tensor, reduce=_local) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, scale, d)`` with ``x = shift + scale * d`` over unmasked positions.

    ``shift`` is the largest unmasked value and ``scale`` the largest ``|x - shift|``
    (the spread), so ``d`` lies in ``[-1, 0]``: squares cannot overflow (x up to 1e30 in
    fp32), the rounding error scales with the spread rather than with ``|x|`` (1e6 + small
    differences keep their precision), and a constant set gives ``d = 0`` exactly.
    ``d`` is 0 at masked positions, whatever ``x`` holds there. ``reduce``: see :func:`masked_whiten`.
    """
    on = mask != 0
    shift = reduce(torch.where(on, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device)).amax(), "max")
    shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)  # nothing unmasked
    diff = torch.where(on, x - shift, torch.zeros((), dtype=x.dtype, device=x.device))
    scale = reduce(diff.abs().amax(), "max")
    d = diff / torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant: 0 / 1 = 0
    return shift, scale, d


def _var_of_normalised(d: Tensor, mask: Tensor, unbiased: bool, reduce=_local) -> tuple[Tensor, Tensor]:
    """Mean and variance of the normalised values ``d`` over unmasked positions (of every
    process, with ``reduce``), in two passes: sum and count, then the squared deviations."""
    total, n = reduce(torch.stack([masked_sum(d, mask), masked_sum(torch.ones_like(d), mask)]), "sum")
    mean = total / n.clamp(min=1.0)
    denom = torch.where(n > 1, n - 1, n) if unbiased else n
    return mean, reduce(masked_sum((d - mean) ** 2, mask), "sum") / denom.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over unmasked positions; divides by ``n - 1`` (``unbiased``) or ``n``.

    Computed as ``scale^2 var(d)`` on ``d = (x - shift) / scale`` (see ``_normalised``):
    the plain ``sum((x - mean)^2)`` overflows fp32 once ``|x - mean|`` passes ~1e19 and
    loses the variance of large, close values (1e6 + small differences) to rounding.
    A constant set, a single position or no position gives 0 exactly.
    """
    mask = mask.to(x.dtype)
    _, scale, d = _normalised(x, mask)
    _, var = _var_of_normalised(d, mask, unbiased)
    return var * scale * scale  # inf only when the variance itself exceeds the dtype


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over unmasked positions; masked positions become 0.

    With ``shift_mean=False`` the mean is added back (scale only), as in TRL/OpenRLHF.
    Evaluated on the normalised ``d`` of ``_normalised`` as
    ``(d - mean_d) / hypot(std_d, sqrt(eps) / scale)``: the same value, finite for any
    finite ``x`` whose spread fits the dtype (magnitudes of 1e30 in fp32 included), with a
    rounding error relative to the spread rather than to ``|x|``. A constant or
    single-valued set gives exactly 0 (not the rounding noise of its mean divided by
    ``sqrt(eps)``), and inf/NaN at masked positions never reach the output.
    ``reduce(t, op)``, ``op`` "sum" or "max": a function reducing a tensor over every process
    holding a part of the batch; the shift, spread, mean and (unbiased) variance are then those
    of the *global* batch, so a batch split over processes is whitened exactly as it would be
    whole (REINFORCE++, Hu 2025: advantages normalised over the global batch). None: this
    tensor alone.
    """
    reduce = reduce or _local
    mask = mask.to(x.dtype)
    shift, scale, d = _normalised(x, mask, reduce)
    mean, var = _var_of_normalised(d, mask, True, reduce)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    root_eps = math.sqrt(eps) / torch.where(scale > 0, scale, torch.ones_like(scale))  # sqrt(eps) in units of scale
    std = torch.hypot(var.sqrt(), root_eps)  # hypot: no overflow/underflow of scale^2
    out = torch.where(scale > 0, (d - mean) / std, zero)  # a constant: 0, even with eps = 0
    if not shift_mean:
        out = out + (shift + scale * mean)
    return torch.where(mask != 0, out, zero)
