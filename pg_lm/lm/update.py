"""The update of a scored rollout: ``--ppo-epochs`` passes of ``--num-minibatches`` optimizer steps,
each accumulated over micro-batches (``--micro-batch-size``), with the rows that cannot change
the gradient left out.

Rows whose advantage is zero on every token (e.g. a group whose samples all got the same reward,
under a group baseline) add exactly nothing to the gradient when the loss is the policy-gradient
term alone; they are left out of the forward / backward, the optimizer still steps, and the
denominators still count them, so the update is the one the full batch would give.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from .health import QUANTITIES
from .loss import micro_loss
from .rollout import Rollout


def update(tr, batch: Rollout, adv: Tensor, returns: Tensor | None) -> tuple[dict, str | None]:
    """(the update's statistics, the first non-finite quantity that skipped one of its optimizer
    steps or None) of ``tr`` (a :class:`~pg_lm.lm.trainer.Trainer`) on ``batch``, with advantages
    ``adv`` (B, T) and value targets ``returns`` (B, T) or None."""
    cfg = tr.cfg
    B = adv.shape[0]
    mb_rows = B // cfg.num_minibatches
    totals: dict[str, float] = {}
    trained, skipped = 0, None
    tr.policy.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, device=adv.device) if cfg.num_minibatches > 1 else torch.arange(B, device=adv.device)
        for m in range(cfg.num_minibatches):
            n, bad = _accumulate(tr, batch, adv, returns, order[m * mb_rows : (m + 1) * mb_rows], totals)
            trained += n
            bad = _optimizer_step(tr, bad, totals)
            skipped = skipped or bad
    if tr.sampler is not None:  # once per update, not per optimizer step: only the next rollout reads it
        tr.sampler.refresh()
    totals.setdefault("loss/policy", 0.0)  # every row skipped: each had advantage 0, so the loss is 0
    totals["perf/trained_frac"] = trained / (B * cfg.ppo_epochs)
    return totals, skipped


def _accumulate(tr, batch: Rollout, adv: Tensor, returns: Tensor | None, rows: Tensor,
                totals: dict) -> tuple[int, str | None]:
    """Accumulate the gradient of the minibatch ``rows`` over its micro-batches (statistics into
    ``totals``); returns (rows trained, the first non-finite quantity seen or None)."""
    cfg, acc, coll = tr.cfg, tr.acc, tr.coll
    mask = batch.completion_mask
    # global denominators: identical loss whatever the micro-batch / process split
    denoms = (coll.sum(mask[rows].sum()), float(len(rows) * coll.world))
    kept = rows_to_train(tr, rows, adv)  # as many on every process, so all take the same branch
    stat_denoms = denoms if len(kept) == len(rows) else (coll.sum(mask[kept].sum()), float(len(kept) * coll.world))
    micro = cfg.micro_batch_size or len(rows)
    G = batch.group_size
    # prompts are shared across a group only when micro-batches are whole groups in order
    share = G if micro % G == 0 and whole_groups(kept, G) else 1
    chunks = kept.split(micro) if len(kept) else ()
    bad = None
    for i, chunk in enumerate(chunks):
        mb, mb_adv, mb_ret = _micro_batch(batch, adv, returns, chunk.to(batch.prompt_ids.device), share)
        with acc.no_sync(tr.policy) if i < len(chunks) - 1 else nullcontext():
            loss, parts, mb_bad = micro_loss(cfg, tr.state.kl_coef, mb, tr.forward(mb, grad=True), mb_adv, mb_ret,
                                             denoms, stat_denoms)
            acc.backward(loss * coll.world)  # DDP averages gradients over processes; the loss is already a global sum
        bad = bad or mb_bad
        for k, v in parts.items():  # means over the update, maxima for the "_max" keys
            totals[k] = (max(totals.get(k, -math.inf), float(v)) if k.endswith("_max") else
                         totals.get(k, 0.0) + float(v) / (cfg.ppo_epochs * cfg.num_minibatches))
    return len(kept), bad


def _micro_batch(batch: Rollout, adv: Tensor, returns: Tensor | None, rows: Tensor, share: int):
    """(the rows ``rows`` of ``batch``, their advantages, their returns or None), trimmed to the
    longest completion among them (padding columns cost a forward and add nothing)."""
    mb = batch.select(rows, group_size=share)
    T = max(int(mb.attention.sum(1).max()), 1)
    for name in ("completion_ids", "completion_mask", "logp", "ref_logp", "values", "sampler_logp", "turn_end",
                 "completion_attention"):
        if getattr(mb, name) is not None:
            setattr(mb, name, getattr(mb, name)[:, :T])
    return mb, adv[rows, :T], returns[rows, :T] if returns is not None else None


def _optimizer_step(tr, bad: str | None, totals: dict) -> str | None:
    """Clip and step (unless any process saw a non-finite value, which skips the step everywhere);
    returns the agreed non-finite quantity or None."""
    for p in tr.params:  # no backward ran (every row skipped): step AdamW as a zero gradient would
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # the norm is measured even without clipping (max_norm inf): a NaN / inf one skips the step
    gn = tr.acc.clip_grad_norm_(tr.params, tr.cfg.max_grad_norm or math.inf)
    if gn is not None:  # (DeepSpeed clips inside its engine and returns None)
        totals["policy/grad_norm"] = float(gn)
        if not math.isfinite(float(gn)) and tr.acc.scaler is None:  # (fp16: the loss scaler skips the step)
            bad = bad or "gradient"
    bad = tr.coll.first(QUANTITIES, bad)
    if bad is None:
        tr.opt.step()
        if tr.sampler is not None:  # the copy now lags the weights until the update's refresh
            tr.sampler.current = False
    # None, not zeros: the next backward then writes each gradient instead of adding it to zeros
    tr.opt.zero_grad(set_to_none=True)
    return bad


def zero_rows_are_inert(cfg, kl_coef: float) -> bool:
    """Whether a row whose advantage is 0 on every token adds exactly nothing to the gradient: true
    when the loss is only the policy-gradient term (no value loss, entropy bonus or KL in the loss)."""
    return not cfg.uses_value_head and not cfg.entropy_coef and not (cfg.kl_in == "loss" and kl_coef > 0)


def rows_to_train(tr, rows: Tensor, adv: Tensor) -> Tensor:
    """``rows`` minus those with zero advantage everywhere, when they are inert (same gradient, less
    work). Every process must run the same number of micro-batches (DDP all-reduces in each
    backward), so each keeps the largest count over processes, topping up with inert rows."""
    if not tr.cfg.skip_zero_advantage or not zero_rows_are_inert(tr.cfg, tr.state.kl_coef):
        return rows
    live = adv[rows].abs().amax(1) > 0  # (len(rows),)
    n = int(tr.coll.max(live.sum()))
    order = torch.cat([rows[live], rows[~live]])  # live rows first, in their original order
    return order[:n].sort().values


def whole_groups(rows: Tensor, G: int) -> bool:
    """Whether ``rows`` is a run of whole groups of G consecutive rows, each in order."""
    if G == 1 or len(rows) % G:
        return G == 1
    g = rows.view(-1, G)
    return bool((g[:, 0] % G == 0).all() and (g == g[:, :1] + torch.arange(G, device=rows.device)).all())
