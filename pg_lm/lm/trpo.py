"""``--update trpo``: TRPO's constrained natural-gradient step (Schulman et al. 2015) on a language
model's trainable weights (the LoRA adapter, or all of them), one step per rollout.

    L(θ)  = -loss(θ)                   the policy loss of docs/algorithms.md without clipping:
                                       aggregate(-ratio · A) (--loss-agg), - entropy bonus, + KL to the
                                       reference in the loss; ratio = π_θ / π_old per token
    D̄(θ)  = mean over completion tokens t of KL(π_old(·|x, y_<t) || π_θ(·|x, y_<t))
    θ     = pg_lm.core.natural_gradient_step(L, D̄, --max-kl, --cg-iters, --cg-damping,
                                             --line-search-steps, --backtrack-ratio)

The KL is exact over the whole vocabulary at each sampled completion position, not the sampled-token
k3 estimate: its Hessian at θ_old is then the exact Fisher matrix of each position's next-token
distribution (the paper's constraint, and the gym backend's), whereas k3's Hessian is the outer
product of the sampled tokens' score functions only -- an unbiased but rank-deficient, noisier
Fisher -- and the line search must check the same quantity it bounds. The price is π_old's
(B, T, V) log-probs held for the step (fp32: 4 B T V bytes, 100 MB for 32 completions of 16
tokens of SmolLM2's 49k vocabulary).

Fisher-vector products differentiate the first backward again (double backward); SDPA's fused
attention kernels have no second derivative, so every forward of the step runs SDPA's math
kernel (the same function at θ_old and at each candidate, so the measured KL at θ_old is 0).

The value head (``--estimator gae`` / ``--baseline value``) is not in the natural step: after it,
one AdamW step on the value loss moves the head alone (gradients only reach its parameters).

Several processes (DDP): each holds a replica of the weights and a share of the batch; the gradient,
each Fisher-vector product, the surrogate and the KL are summed over processes (normalised by the
global token / sequence counts), so every process solves the same system and takes the same step.

Left out: sharded weights (FSDP2, DeepSpeed: refused), micro-batches (each process's rollout is one
forward), PPO's clipping and rollout reuse (``--ppo-epochs``, ``--num-minibatches``), the
sampler-learner correction.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from pg_lm.core import aggregate, kl_estimate, masked_sum, natural_gradient_step, policy_loss, value_loss

from .health import QUANTITIES, nonfinite


@contextmanager
def twice_differentiable():
    """Attention through SDPA's math kernel, which has a second derivative (the fused ones do not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def update(tr, batch, adv: Tensor, returns: Tensor | None) -> tuple[dict, str | None]:
    """One TRPO step of ``tr``'s policy on ``batch`` (advantages ``adv`` (B, T)), then the value head's
    regression step when ``returns`` (B, T) are given. Returns (the step's statistics, the first
    non-finite quantity or None: then nothing moved)."""
    cfg, acc = tr.cfg, tr.acc
    policy = acc.unwrap_model(tr.policy)
    head = {id(p) for p in policy.value_head.parameters()} if policy.value_head is not None else set()
    params = [p for p in tr.params if id(p) not in head]  # what the natural step moves
    mask, ids = batch.completion_mask, batch.completion_ids  # (B, T)
    # several processes: sums over them (see natural_gradient_step)
    reduce = (lambda t: tr.coll.reduce(t.reshape(-1).clone(), "sum").view_as(t)) if acc.num_processes > 1 else None
    # global denominators: each process's loss and KL are its share of the whole batch's
    n_tok = float(reduce(mask.sum()) if reduce else mask.sum())
    n_seq = float(mask.shape[0] * acc.num_processes)
    tr.policy.eval()  # no dropout: every forward of the step is the same function of θ

    def log_probs() -> Tensor:  # (B, T, V) fp32 log π_θ at the completion positions
        with acc.autocast(), twice_differentiable():
            logits, _ = policy.completion_logits(batch.prompt_ids, batch.prompt_mask, ids, batch.attention, batch.group_size)
        return torch.log_softmax(logits.float() / cfg.temperature, -1)

    def agg(x: Tensor) -> Tensor:
        return aggregate(x, mask, cfg.loss_agg, num_tokens=n_tok, num_seqs=n_seq, norm_len=cfg.max_new_tokens)

    def objective(logq: Tensor) -> tuple[Tensor, Tensor]:  # (L(θ), entropy per token (B, T))
        logp = logq.gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
        entropy = -(logq.exp() * logq).sum(-1)  # (B, T)
        loss = agg(policy_loss(logp, old_logp, adv)[0])
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * agg(entropy)
        if cfg.kl_in == "loss" and batch.ref_logp is not None and tr.state.kl_coef > 0:
            loss = loss + tr.state.kl_coef * agg(kl_estimate(logp, batch.ref_logp, cfg.kl_estimator))
        return -loss, entropy

    def mean_kl() -> Tensor:  # exact KL(π_old || π_θ) per position, mean over (every process's) completion tokens
        return masked_sum((old_p * (old_logq - log_probs())).sum(-1), mask) / n_tok

    logq = log_probs()  # at θ_old, with its graph: the gradient's forward
    old_logq = logq.detach()  # (B, T, V) π_old, fixed for the step
    old_p = old_logq.exp()
    old_logp = old_logq.gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
    before, entropy = objective(logq)
    total = reduce or (lambda t: t)  # every logged number is the whole batch's, the same on every process
    stats = {"loss/policy": -float(total(before.detach())),
             "policy/entropy": float(total(masked_sum(entropy.detach(), mask))) / n_tok, "perf/trained_frac": 1.0}
    bad = nonfinite({"log-prob": old_logp}, mask) or (None if bool(torch.isfinite(before)) else "loss")
    bad = tr.coll.first(QUANTITIES, bad)  # every process takes the same branch
    if bad is None:
        stats.update(natural_gradient_step(before, lambda: objective(log_probs())[0], mean_kl, params, cfg.max_kl,
                                           cfg.cg_iters, cfg.cg_damping, cfg.line_search_steps, cfg.backtrack_ratio,
                                           reduce))
        if not math.isfinite(stats["policy/grad_norm"]):
            bad = "gradient"  # (the step did not move)
    if bad is None and returns is not None and head:
        stats["loss/value"] = _fit_value_head(tr, policy, batch, returns, agg, reduce)
    if tr.sampler is not None:  # the sampling copy follows the weights (the next rollout reads it)
        tr.sampler.current = False
        tr.sampler.refresh()
    return stats, bad


def _fit_value_head(tr, policy, batch, returns: Tensor, agg, reduce) -> float:
    """One AdamW step of the value head alone on the value loss (the trunk gets no gradient); the
    forward is the unwrapped policy's (no DDP reducer waits for this gradient: it is summed here)."""
    _, values, _ = tr.forward(batch, grad=True, model=policy)
    old_v = batch.values if batch.values is not None else values.detach()
    vl = agg(value_loss(values, old_v, returns, tr.cfg.value_clip))
    head = list(policy.value_head.parameters())
    for p, g in zip(head, torch.autograd.grad(vl, head)):
        p.grad = reduce(g) if reduce else g
    if tr.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(head, tr.cfg.max_grad_norm)
    tr.opt.step()  # AdamW steps only the parameters that have a gradient: the head's
    tr.opt.zero_grad(set_to_none=True)
    return float(reduce(vl.detach()) if reduce else vl.detach())  # (the whole batch's loss)
