"""Policy-gradient losses, KL estimators, entropy and loss aggregation.

All per-token functions take and return ``(B, T)`` tensors; aggregation reduces them
to a scalar with a denominator that the caller can make global (see ``aggregate``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import masked_mean, masked_sum

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {v}" for k, v in shapes.items()) + " (expected equal (B, T))")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman, "Approximating KL").

    With ``log r = ref_logp - logp``: k1 = ``-log r`` (unbiased, high variance; belongs in
    the reward: its gradient as a loss is wrong), k2 = ``(log r)^2 / 2``, k3 =
    ``r - 1 - log r`` (unbiased, always >= 0). (B, T) -> (B, T).
    """
    _same_shape(logp=logp, ref_logp=ref_logp)
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        log_r = log_r.clamp(-20.0, 20.0)  # exp overflow guard; |log r| > 20 is already a broken run
        return torch.expm1(log_r) - log_r  # expm1: exactly >= 0, accurate for small log r
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float | None = None,
    clip_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss and clip indicator, (B, T) -> ((B, T), (B, T)).

    ``ratio = exp(logp - old_logp)``; without clipping the loss is ``-A * ratio``, whose
    gradient at ``old_logp = logp.detach()`` is REINFORCE's ``-A ∇log π``. With clipping
    (PPO, Schulman et al. 2017; separate bounds as in DAPO) it is
    ``max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))``.

    A token with ``A = 0`` (every token of an all-equal GRPO group) has loss, gradient
    and clip indicator exactly 0: its log-ratio is replaced by 0 before ``exp``, since
    ``0 * exp(log ratio)`` is NaN once the ratio overflows (log ratio > 88 in fp32).
    """
    _same_shape(logp=logp, old_logp=old_logp, advantages=advantages)
    log_ratio = torch.where(advantages == 0, torch.zeros_like(logp), logp - old_logp)
    ratio = torch.exp(log_ratio)
    loss = -advantages * ratio
    if clip_low is None and clip_high is None:
        return loss, torch.zeros_like(loss)
    lo = 1.0 - (clip_low if clip_low is not None else float("inf"))
    hi = 1.0 + (clip_high if clip_high is not None else float("inf"))
    clipped = -advantages * ratio.clamp(lo, hi)
    return torch.maximum(loss, clipped), (clipped > loss).to(loss.dtype)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = None) -> Tensor:
    """Per-token ``0.5 (V - R)^2``; with ``clip`` PPO's pessimistic clipped form
    ``0.5 max((V - R)^2, (old_V + clip(V - old_V, ±clip) - R)^2)``. (B, T) -> (B, T)."""
    _same_shape(values=values, old_values=old_values, returns=returns)
    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return 0.5 * loss


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis, computed in fp32. (..., V) -> (...)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # 0 log 0 = 0 (masked -inf logits)


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    norm_len: float | None = None,
) -> Tensor:
    """Reduce a ``(B, T)`` per-token loss to a scalar.

    * ``token-mean``: ``sum(loss * mask) / num_tokens`` (every token weighs the same).
    * ``seq-mean-token-mean``: ``sum_i mean_t(loss_i) / num_seqs`` (every sequence weighs the same).
    * ``seq-mean-token-sum-norm``: ``sum(loss * mask) / (num_seqs * norm_len)`` with a constant
      ``norm_len`` (Dr. GRPO, Liu et al. 2025): no length bias.

    ``num_tokens`` / ``num_seqs`` default to this batch's counts. Pass the counts of the
    *global* batch when it is split into micro-batches or processes: the summed
    micro-batch losses then equal the loss of the whole batch, however it was split.
    ``norm_len`` is required by ``seq-mean-token-sum-norm`` (a batch's own T would
    make the loss depend on padding).

    Every mode sums through ``masked_sum``: masked positions are selected away, not
    multiplied by 0, so a loss that is inf/NaN on padding (log-prob -inf there) and a
    fully masked row add exactly 0, the same in all modes.
    """
    _same_shape(loss=loss, mask=mask)
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        n = mask.sum() if num_tokens is None else num_tokens
        return masked_sum(loss, mask) / max(float(n), 1.0)
    n_seq = loss.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=1).sum() / max(float(n_seq), 1.0)
    if mode == "seq-mean-token-sum-norm":
        if norm_len is None:
            raise ValueError("seq-mean-token-sum-norm needs a constant norm_len (e.g. the max completion length)")
        if not norm_len > 0:
            raise ValueError(f"norm_len must be > 0, got {norm_len}")
        return masked_sum(loss, mask) / (max(float(n_seq), 1.0) * norm_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGG_MODES}")
