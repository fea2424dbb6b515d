"""Moments of a stochastic gradient estimator over K independent batches.

A policy-gradient estimator turns one batch of samples into a gradient ĝ (P,) (P = the
trainable parameters, flattened). Drawn K times at a fixed policy, ĝ_1..ĝ_K give

    mean            ḡ = (1/K) Σ_k ĝ_k                                        (P,)
    total variance  V = 1/(K-1) Σ_k ||ĝ_k - ḡ||²   = tr Cov[ĝ], unbiased      scalar
    signal / noise  ||ḡ|| / √V                                               scalar
    ... debiased    √max(||ḡ||² - V/K, 0) / √V: ||ḡ||² overstates ||E ĝ||² by V/K  scalar
    cosine          ⟨ḡ, g_ref⟩ / (||ḡ|| ||g_ref||)  to a large-batch reference scalar

(the "total variance" of Greensmith et al. 2004, JMLR 5; the signal-to-noise ratio as in
Roberts & Tedrake 2009). The moments are accumulated one batch at a time (Welford 1962),
so K gradients of a large model never have to be held at once.
"""

from __future__ import annotations

import math

from torch import Tensor


def welford_update(mean: Tensor, m2: float, count: int, g: Tensor) -> tuple[Tensor, float]:
    """One batch's gradient ``g`` (P,) folded into (``mean`` (P,), ``m2``) of ``count`` earlier ones:
    ``m2`` is Σ ||ĝ_k - ḡ||² so far. Returns the new (mean (P,), m2); exact, no cancellation."""
    if g.shape != mean.shape:
        raise ValueError(f"gradient of shape {tuple(g.shape)} for a mean of shape {tuple(mean.shape)}")
    delta = g - mean  # (P,)
    mean = mean + delta / (count + 1)
    return mean, m2 + float(delta.double() @ (g - mean).double())


def gradient_moments(grads: Tensor) -> tuple[Tensor, float]:
    """(mean (P,), total variance) of K gradient estimates ``grads`` (K, P), K >= 2: the variance
    is the mean squared distance to the mean with K - 1 in the denominator (unbiased for tr Cov)."""
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"need (K, P) gradients with K >= 2, got shape {tuple(grads.shape)}")
    mean = grads.mean(0)  # (P,)
    return mean, float(((grads - mean) ** 2).sum(1).double().sum()) / (grads.shape[0] - 1)


def debiased_snr(mean_norm: float, variance: float, batches: int) -> float:
    """||E ĝ|| / √V with the noise taken out of the mean: √max(||ḡ||² - V/K, 0) / √V.

    ḡ averages K noisy estimates, so E||ḡ||² = ||E ĝ||² + V/K: the plain ratio ||ḡ|| / √V never falls
    below about 1/√K even when the estimator has no signal at all, and subtracting V/K makes the square
    of the numerator unbiased. 0 when the noise accounts for all of ||ḡ|| at this K (the signal is not
    resolved: raise K); inf / nan for a variance of 0 as for the plain ratio."""
    if batches < 2:
        raise ValueError(f"need K >= 2 batches, got {batches}")
    if variance <= 0:
        return math.inf if mean_norm > 0 else math.nan
    return math.sqrt(max(mean_norm**2 - variance / batches, 0.0)) / math.sqrt(variance)


def gradient_summary(mean: Tensor, variance: float, reference: Tensor | None = None,
                     batches: int | None = None) -> dict[str, float]:
    """The reported numbers of one estimator from its ``mean`` (P,) and total ``variance``:
    ``variance``, ``mean_norm`` ||ḡ||, ``snr`` ||ḡ|| / √variance (inf for a variance of 0, nan when
    the mean is 0 too: every batch gave the zero gradient, e.g. no reward spread), with the number
    of ``batches`` K behind them also ``snr_debiased`` (:func:`debiased_snr`), and ``cosine`` to
    ``reference`` (P,) when given (nan when either vector is 0)."""
    norm = float(mean.double().norm())
    out = {"variance": variance, "mean_norm": norm,
           "snr": norm / math.sqrt(variance) if variance > 0 else math.inf if norm > 0 else math.nan}
    if batches is not None:
        out["snr_debiased"] = debiased_snr(norm, variance, batches)
    if reference is not None:
        if reference.shape != mean.shape:
            raise ValueError(f"reference of shape {tuple(reference.shape)} for a mean of shape {tuple(mean.shape)}")
        denom = norm * float(reference.double().norm())
        out["cosine"] = float(mean.double() @ reference.double()) / denom if denom > 0 else math.nan
    return out
