"""TRPO's actor step on one rollout (Schulman et al. 2015), built from pg_lm.core.natural.

    g  = ∇ L(θ_old)                     L = masked mean of ratio · A (+ entropy_coef · entropy)
    x  = CG(F + λI, g), cg_iters        F v by double backward of the exact mean KL
    β  = sqrt(2 δ / xᵀ(F + λI)x)         δ = max_kl
    θ  = θ_old + f β x                  f = 1, r, r², ... until L improves and KL <= δ,
                                        else θ stays θ_old (the rollout is then only
                                        used for the critic)

Only the actor's parameters move here (the actor MLP and, for a Gaussian head, its
log-std); the critic is fitted afterwards by ordinary regression steps in
:func:`pg_lm.gym.algos.update`. The KL is ``KL(π_old || π_θ)`` over the rollout's
states, exact per state (not a sample estimate), as in the paper's constraint.

Left out: the paper's "vine" rollouts, sub-sampling the states for the Fisher-vector
products (sb3-contrib's ``sub_sampling_factor``), and the expected-improvement ratio test
some implementations add to the line search.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pg_lm.core import masked_mean, masked_whiten, natural_gradient_step

from .config import GymConfig
from .policy import ActorCritic


def actor_params(policy: ActorCritic) -> list[Tensor]:
    """The parameters TRPO moves: the actor MLP's and the action head's (a Gaussian's log-std)."""
    return [*policy.actor.parameters(), *policy.head.parameters()]


def natural_step(policy: ActorCritic, mb: dict[str, Tensor], cfg: GymConfig) -> dict[str, float]:
    """One constrained natural-gradient step of the actor on a flattened rollout ``mb``
    (``obs`` (M, D), ``actions``, ``logp`` (M,) at sampling time, ``adv`` (M,), ``mask`` (M,)).

    Returns the step's statistics: the surrogate gain, the measured mean KL after the step,
    the accepted fraction of the full step (0 = rejected) and the entropy."""
    obs, actions, old_logp, mask = mb["obs"], mb["actions"], mb["logp"], mb["mask"]
    adv = masked_whiten(mb["adv"], mask) if cfg.whiten_advantages else mb["adv"]  # (M,)
    params = actor_params(policy)
    with torch.no_grad():
        old = policy.head.snapshot(policy.actor(obs))  # π_old: the rollout policy, fixed

    def surrogate() -> tuple[Tensor, Tensor]:
        out = policy.actor(obs)
        ratio = torch.exp(policy.head.log_prob(out, actions) - old_logp)  # (M,)
        entropy = masked_mean(policy.head.entropy(out), mask)
        return masked_mean(ratio * adv, mask) + cfg.entropy_coef * entropy, entropy

    def mean_kl() -> Tensor:
        return masked_mean(policy.head.kl(old, policy.actor(obs)), mask)

    before, entropy = surrogate()
    stats = natural_gradient_step(before, lambda: surrogate()[0], mean_kl, params, cfg.max_kl, cfg.cg_iters,
                                  cfg.cg_damping, cfg.line_search_steps, cfg.backtrack_ratio)
    return {"loss/policy": -float(before.detach()), "policy/entropy": float(entropy.detach()),
            **{k: v for k, v in stats.items() if k != "policy/grad_norm"}}
