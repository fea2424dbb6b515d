"""The loss of one micro-batch: the policy-gradient term (PPO's clipped surrogate when the rollout
is reused), the entropy bonus, the value loss, the KL to the reference when it is in the loss, the
sampler-learner correction -- and the step's diagnostics.

Every term is aggregated (``--loss-agg``) with the *global* token and sequence counts of the
optimizer step as denominators, so the sum of the micro-batches' losses over every process is
the loss of the whole batch, however it is split (docs/algorithms.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pg_lm.core import (
    aggregate,
    approx_kl,
    clip_fractions,
    kl_estimate,
    log_ratio,
    policy_loss,
    sampler_is_weights,
    value_loss,
)

from .health import nonfinite
from .rollout import Rollout


def micro_loss(cfg, kl_coef: float, mb: Rollout, out: tuple, adv: Tensor, returns: Tensor | None, denoms: tuple,
               stat_denoms: tuple) -> tuple[Tensor, dict, str | None]:
    """(loss, diagnostics, the first non-finite quantity or None) of the micro-batch ``mb`` whose
    forward gave ``out`` = (log-probs (B, T) with grad, values (B, T) or None, entropy (B, T)).

    ``adv`` (B, T) advantages, ``returns`` (B, T) value targets or None; the loss is normalised by
    the global ``denoms`` = (tokens, sequences) of the optimizer step; diagnostics by
    ``stat_denoms``, the counts of the rows actually trained. ``kl_coef``: the KL coefficient now."""
    logp, values, entropy = out
    mask = mb.completion_mask
    bad = nonfinite({"log-prob": logp.detach()}, mask)
    old = mb.logp if mb.logp is not None else logp.detach()  # π_old: the rollout's, or this forward's (one pass)

    def agg(x, d=denoms):
        return aggregate(x, mask, cfg.loss_agg, num_tokens=d[0], num_seqs=d[1], norm_len=cfg.max_new_tokens)

    pg, clipped = policy_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, cfg.ratio_level, mask)
    parts = _policy_stats(cfg, logp.detach(), old, adv, clipped, entropy.detach(), mask, lambda x: agg(x, stat_denoms))
    if mb.sampler_logp is not None:  # the learner's π_old against the sampler's numbers for the same tokens
        w, capped = sampler_is_weights(old, mb.sampler_logp, mask, cfg.sampler_correction, cfg.sampler_is_cap,
                                       cfg.sampler_is_level)  # (B, T) each
        bad = bad or nonfinite({"IS weight": w}, mask)
        if cfg.sampler_correction != "none":
            pg = pg * w
            parts.update({"sampler/is_weight": agg(w, stat_denoms), "sampler/is_capped_frac": agg(capped, stat_denoms)})
        gap = torch.where(mask.bool(), old - mb.sampler_logp, 0.0)  # (B, T)
        parts.update({"sampler/logp_gap": agg(gap.abs(), stat_denoms), "sampler/logp_gap_max": gap.abs().max(),
                      "sampler/kl": agg(kl_estimate(mb.sampler_logp, old, "k3"), stat_denoms)})
    loss = agg(pg)
    parts["loss/policy"] = loss.detach()
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * agg(entropy)
    if values is not None and returns is not None:
        old_v = mb.values if mb.values is not None else values.detach()
        vl = agg(value_loss(values, old_v, returns, cfg.value_clip))
        loss = loss + cfg.vf_coef * vl
        parts["loss/value"] = vl.detach()
    if cfg.kl_in == "loss" and mb.ref_logp is not None and kl_coef > 0:
        kl = agg(kl_estimate(logp, mb.ref_logp, cfg.kl_estimator))
        loss = loss + kl_coef * kl
        parts["loss/kl"] = kl.detach()
    if not bool(torch.isfinite(loss)):
        bad = bad or "loss"
    return loss, parts, bad


def _policy_stats(cfg, logp: Tensor, old: Tensor, adv: Tensor, clipped: Tensor, entropy: Tensor, mask: Tensor,
                  agg) -> dict:
    """The clip fractions, entropies and approximate KL of the update so far, aggregated by ``agg``."""
    ratio = torch.exp(log_ratio(logp, old, mask, cfg.ratio_level))  # (B, T)
    low, high, dual = clip_fractions(ratio, adv, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c)
    parts = {"policy/clip_frac": agg(clipped), "policy/clip_frac_low": agg(low), "policy/clip_frac_high": agg(high),
             "policy/entropy": agg(entropy),
             "policy/entropy_sampled": agg(-old),  # -log π_old of the drawn tokens: entropy's estimate
             "policy/approx_kl_k3": agg(approx_kl(logp, old))}
    if cfg.clip_ratio_c is not None:
        parts["policy/clip_frac_dual"] = agg(dual)
    return parts

