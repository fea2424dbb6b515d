"""Sampler-learner mismatch: importance weights for completions sampled by another numeric path.

The completions are drawn by a sampler (a bf16 copy of the weights, a CPU decode layer, an
inference engine) whose log-probs ``sampler_logp`` differ from the learner's ``logp`` for the same
weights. The policy gradient is an expectation under the learner's π, so the samples are off-policy
by the ratio ``ρ = π_learner / π_sampler``. Truncated importance sampling (Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training"; Espeholt et al. 2018 for the
truncation) multiplies each token's policy-gradient loss by ``min(ρ, C)``; masked importance
sampling (Liu et al. 2025, "When Speed Kills Stability") by ``ρ · 1[ρ <= C]``, dropping the
tokens (or sequences) the sampler got most wrong. Both are the identity when the two paths agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import _same_shape

SAMPLER_CORRECTIONS = ("none", "tis", "mask")


def sampler_log_ratio(logp: Tensor, sampler_logp: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """``log ρ`` per token, (B, T) -> (B, T), no gradient: ``logp_t - sampler_logp_t`` (``token``), or the
    log of the whole completion's ratio ``sum_t mask_t (logp_t - sampler_logp_t)`` on each of its
    tokens (``sequence``: the probability of the sequence under each path). 0 where masked."""
    _same_shape(logp=logp, sampler_logp=sampler_logp, mask=mask)
    mask = mask.to(logp.dtype)
    diff = torch.where(mask != 0, logp.detach() - sampler_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if level == "token":
        return diff * mask
    if level == "sequence":
        return diff.sum(1, keepdim=True) * mask  # (B, 1) broadcast to the row's tokens
    raise ValueError(f"unknown correction level {level!r}; choose token or sequence")


def sampler_is_weights(logp: Tensor, sampler_logp: Tensor, mask: Tensor, mode: str = "tis", cap: float = 2.0,
                       level: str = "token") -> tuple[Tensor, Tensor]:
    """(weights, capped), both (B, T), no gradient: the factor on each token's policy-gradient loss and
    where ``ρ > cap`` (1) or not (0).

    ``tis``: ``w = min(ρ, cap)``; ``mask``: ``w = ρ`` where ``ρ <= cap``, else 0; ``none``: ``w = 1``.
    ``ρ`` from :func:`sampler_log_ratio` at ``level``. ``cap >= 1`` so that agreeing paths
    (``ρ = 1``) give ``w = 1`` exactly. Weights are 0 where masked.
    """
    if cap < 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    log_rho = sampler_log_ratio(logp, sampler_logp, mask, level)  # (B, T)
    m = mask.to(logp.dtype)
    log_cap = math.log(cap)
    capped = (log_rho > log_cap).to(logp.dtype) * m
    if mode == "none":
        return m, capped
    if mode == "tis":
        return torch.exp(log_rho.clamp(max=log_cap)) * m, capped
    if mode == "mask":
        return torch.exp(log_rho.clamp(max=log_cap)) * (1.0 - capped) * m, capped
    raise ValueError(f"unknown sampler correction {mode!r}; choose one of {SAMPLER_CORRECTIONS}")
