"""TRPO's actor step on one rollout (Schulman et al. 2015), built from pg_lm.core.natural.

    g  = ∇ L(θ_old)                     L = masked mean of ratio · A (+ ent_coef · entropy)
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

from pg_lm.core import (backtracking_line_search, conjugate_gradient, fisher_vector_product, flat_grad,
                        masked_mean, masked_whiten, step_scale)

from .config import GymConfig
from .policy import ActorCritic


def actor_params(policy: ActorCritic) -> list[Tensor]:
    """The parameters TRPO moves: the actor MLP's and the action head's (a Gaussian's log-std)."""
    return [*policy.actor.parameters(), *policy.head.parameters()]


@torch.no_grad()
def _assign(params: list[Tensor], flat: Tensor) -> None:
    """Write the flat vector (P,) into ``params`` in place (optimizer state stays attached)."""
    i = 0
    for p in params:
        p.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def natural_step(policy: ActorCritic, mb: dict[str, Tensor], cfg: GymConfig) -> dict[str, float]:
    """One constrained natural-gradient step of the actor on a flattened rollout ``mb``
    (``obs`` (M, D), ``actions``, ``logp`` (M,) at sampling time, ``adv`` (M,), ``mask`` (M,)).

    Returns the step's statistics: the surrogate gain, the measured mean KL after the step,
    the accepted fraction of the full step (0 = rejected) and the entropy."""
    obs, actions, old_logp, mask = mb["obs"], mb["actions"], mb["logp"], mb["mask"]
    adv = masked_whiten(mb["adv"], mask) if cfg.norm_adv else mb["adv"]  # (M,)
    params = actor_params(policy)
    with torch.no_grad():
        old = policy.head.snapshot(policy.actor(obs))  # π_old: the rollout policy, fixed

    def surrogate() -> tuple[Tensor, Tensor]:
        out = policy.actor(obs)
        ratio = torch.exp(policy.head.log_prob(out, actions) - old_logp)  # (M,)
        entropy = masked_mean(policy.head.entropy(out), mask)
        return masked_mean(ratio * adv, mask) + cfg.ent_coef * entropy, entropy

    def mean_kl() -> Tensor:
        return masked_mean(policy.head.kl(old, policy.actor(obs)), mask)

    before, entropy = surrogate()
    g = flat_grad(before, params)  # (P,)
    fvp = fisher_vector_product(mean_kl, params, cfg.cg_damping)
    x = conjugate_gradient(fvp, g, cfg.cg_iters)  # (P,) ≈ (F + λI)⁻¹ g
    stats = {"loss/policy": -float(before.detach()), "policy/entropy": float(entropy.detach()), "policy/kl": 0.0,
             "policy/surrogate_gain": 0.0, "policy/step_fraction": 0.0}
    fx = fvp(x)
    if not float(x @ fx) > 0:  # g = 0 (e.g. all advantages zero): no direction to step in
        return stats
    full = step_scale(x, fx, cfg.max_kl) * x  # (P,)
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])  # (P,)
    base, last = float(before.detach()), {}

    @torch.no_grad()
    def evaluate(fraction: float) -> tuple[float, float]:
        _assign(params, theta_old + fraction * full)
        last.update({"policy/surrogate_gain": float(surrogate()[0]) - base, "policy/kl": float(mean_kl())})
        return last["policy/surrogate_gain"], last["policy/kl"]

    fraction = backtracking_line_search(evaluate, cfg.max_kl, cfg.line_search_steps, cfg.backtrack_ratio)
    if fraction is None:
        _assign(params, theta_old)
        return stats
    # the search returns at the accepted point, so the parameters and `last` are that point's
    return dict(stats, **last, **{"policy/step_fraction": fraction})
