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
RATIO_LEVELS = ("token", "sequence")


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


def approx_kl(logp: Tensor, old_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_old || π_θ) from tokens sampled by π_old: how far one update
    moved the policy, the diagnostic logged as ``policy/approx_kl_k3`` (CleanRL's ``approx_kl``).

    With ``log r = logp - old_logp`` (r = π_θ / π_old): ``r - 1 - log r``, which is
    :func:`kl_estimate` with π = π_old and π_ref = π_θ. Unbiased, since E_{π_old}[r] = 1, and
    >= 0 on every token; 0 where the two agree. ``logp`` is log π_θ (detach it: this is a
    diagnostic, not a loss), ``old_logp`` log π_old at sampling time. (B, T) -> (B, T).
    """
    return kl_estimate(old_logp, logp, "k3")


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor | None = None, level: str = "token") -> Tensor:
    """Per-token log importance ratio ``log π_θ / π_old`` at the token or the sequence level. (B, T) -> (B, T).

    * ``token`` (PPO, GRPO): ``logp_t - old_logp_t``.
    * ``sequence`` (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7 and its
      GSPO-token form, eq. 13): the length-normalised log-ratio of the whole completion
      ``log s_i = (1 / |y_i|) sum_t mask_it (logp_it - old_logp_it)`` on every token, written as
      ``sg[log s_i] + logp_t - sg[logp_t]``: the value is ``log s_i`` on each token and the
      gradient of ``exp`` of it is ``s_i ∇ logp_t``, so that the mean over a completion's
      tokens of ``-A_i exp(.)`` has exactly GSPO's gradient ``-A_i ∇ s_i``. ``mask`` is required.
    """
    _same_shape(logp=logp, old_logp=old_logp)
    if level == "token":
        return logp - old_logp
    if level != "sequence":
        raise ValueError(f"unknown ratio level {level!r}; choose one of {RATIO_LEVELS}")
    if mask is None:
        raise ValueError("a sequence-level ratio needs the completion mask")
    _same_shape(logp=logp, mask=mask)
    seq = masked_mean((logp - old_logp).detach(), mask, dim=1)  # (B,) log s_i
    return seq[:, None] + logp - logp.detach()  # (B, T): value log s_i, gradient ∇ logp_t


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_c: float | None = None,
    ratio_level: str = "token",
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss and clip indicator, (B, T) -> ((B, T), (B, T)).

    ``ratio = exp(log_ratio(logp, old_logp, mask, ratio_level))``; without clipping the loss is
    ``-A * ratio``, whose gradient at ``old_logp = logp.detach()`` is REINFORCE's ``-A ∇log π``.
    With clipping (PPO, Schulman et al. 2017; separate bounds as in DAPO) it is
    ``max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))``. ``clip_c`` (dual-clip PPO,
    Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. 5) bounds the loss
    of a negative advantage by ``-A c`` (c > 1): ``min(that, -A c)`` where ``A < 0``, so a token
    whose ratio has grown far (``ratio > c``) cannot push the loss without limit.
    ``ratio_level="sequence"`` is GSPO (see :func:`log_ratio`; pair it with the
    ``seq-mean-token-mean`` aggregation for GSPO's objective). The indicator is 1 where a clipped
    branch (either) set the loss.

    A token with ``A = 0`` (every token of an all-equal GRPO group) has loss, gradient
    and clip indicator exactly 0: its log-ratio is replaced by 0 before ``exp``, since
    ``0 * exp(log ratio)`` is NaN once the ratio overflows (log ratio > 88 in fp32).
    """
    _same_shape(logp=logp, old_logp=old_logp, advantages=advantages)
    lr = log_ratio(logp, old_logp, mask, ratio_level)  # (B, T)
    ratio = torch.exp(torch.where(advantages == 0, torch.zeros_like(lr), lr))
    loss = -advantages * ratio
    out, clipped = loss, torch.zeros_like(loss)
    if clip_low is not None or clip_high is not None:
        lo = 1.0 - (clip_low if clip_low is not None else float("inf"))
        hi = 1.0 + (clip_high if clip_high is not None else float("inf"))
        c_loss = -advantages * ratio.clamp(lo, hi)
        out, clipped = torch.maximum(loss, c_loss), (c_loss > loss).to(loss.dtype)
    if clip_c is not None:
        bound = -advantages * clip_c  # (B, T)
        dual = (advantages < 0) & (out > bound)
        out, clipped = torch.where(dual, bound, out), torch.maximum(clipped, dual.to(loss.dtype))
    return out, clipped


def clip_fractions(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float | None = None,
    clip_high: float | None = None,
    clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Where each clip of :func:`policy_loss` is active, as three (B, T) 0/1 tensors (low, high, dual).

    ``low``: ``A < 0`` and ``ratio < 1 - clip_low`` (the probability of a bad token was already cut
    enough); ``high``: ``A > 0`` and ``ratio > 1 + clip_high`` (a good token's probability was
    already raised enough; DAPO's clip-higher moves this one); ``dual``: ``A < 0`` and
    ``ratio > clip_c``. A bound left as None is never active. (B, T) -> 3 x (B, T).
    """
    _same_shape(ratio=ratio, advantages=advantages)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    low = (advantages < 0) & (ratio < 1.0 - clip_low) if clip_low is not None else never
    high = (advantages > 0) & (ratio > 1.0 + clip_high) if clip_high is not None else never
    dual = (advantages < 0) & (ratio > clip_c) if clip_c is not None else never
    return low.to(ratio.dtype), high.to(ratio.dtype), dual.to(ratio.dtype)


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
