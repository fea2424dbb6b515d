"""The five algorithms as data: an advantage function, a critic or not, how the actor steps.

Everything else -- rollout, loss, optimiser step, logging -- is the one loop in
train.py and :func:`update` here, built on the core estimators:

==================  ==========================  ========  ================  ==============
algo                advantage                   critic    rollout           update
==================  ==========================  ========  ================  ==============
reinforce           G_t (Monte-Carlo return)    no        whole episodes    1 full-batch step
reinforce-baseline  G_t - V(s_t)                baseline  whole episodes    1 full-batch step
a2c                 GAE(γ, λ)                   bootstrap n steps per env   1 full-batch step
ppo                 GAE(γ, λ)                   bootstrap n steps per env   ppo_epochs x num_minibatches,
                                                                            clipped
trpo                GAE(γ, λ)                   bootstrap n steps per env   1 natural-gradient step within
                                                                            max_kl (trpo.py); the critic:
                                                                            ppo_epochs x num_minibatches
                                                                            of regression
==================  ==========================  ========  ================  ==============

Under TRPO the Adam optimizer only ever sees the critic's gradients (the actor's stay
None, which Adam skips), so it is in effect the critic's own optimizer, and its lr is
the critic's.

Left out on purpose: PPO's early stop on a target KL, shared actor-critic trunks,
separate optimisers for actor and critic (except TRPO's, above), gSDE.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from pg_lm.core import aggregate, approx_kl, discounted_returns, explained_variance, gae, masked_mean, masked_whiten
from pg_lm.core import policy_loss, value_loss

from .config import GymConfig
from .policy import ActorCritic
from .rollout import Rollout
from .trpo import natural_step

Advantage = Callable[[Rollout, float, float], "tuple[Tensor, Tensor]"]


def mc_advantage(r: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Plain REINFORCE (Williams 1992): the advantage is the Monte-Carlo return G_t.

    No critic, so a time-limit truncation cuts the return with 0 (the one bias left)."""
    G = discounted_returns(r.rewards, r.mask, gamma, r.terminated, r.truncated)  # (B, T)
    return G, G


def mc_baseline_advantage(r: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """REINFORCE with a learned baseline: ``A = G_t - V(s_t)``; ``G_t`` is also V's target.

    Episodes are whole (see Collector.collect), so only a time-limit truncation
    bootstraps, from V(final obs); a termination never does."""
    G = discounted_returns(r.rewards, r.mask, gamma, r.terminated, r.truncated, r.next_values)  # (B, T)
    return (G - r.values) * r.mask, G


def gae_advantage(r: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages and λ-returns (the value targets), bootstrapping on truncation
    and at the rollout boundary."""
    return gae(r.rewards, r.values, r.mask, gamma, lam, r.terminated, r.truncated, r.next_values)


@dataclass(frozen=True)
class Algo:
    """What distinguishes one algorithm from another; the rest is shared."""

    advantage: Advantage  # Rollout, γ, λ -> (advantages, value targets), both (B, T)
    critic: bool  # a learned V(s) exists
    complete_episodes: bool  # Monte-Carlo returns need whole episodes in each rollout
    ppo: bool  # several epochs of minibatches with the clipped surrogate (else one step)
    trpo: bool = False  # the actor takes one KL-constrained natural-gradient step; the critic regresses alone


ALGOS: dict[str, Algo] = {
    "reinforce": Algo(mc_advantage, critic=False, complete_episodes=True, ppo=False),
    "reinforce-baseline": Algo(mc_baseline_advantage, critic=True, complete_episodes=True, ppo=False),
    "a2c": Algo(gae_advantage, critic=True, complete_episodes=False, ppo=False),
    "ppo": Algo(gae_advantage, critic=True, complete_episodes=False, ppo=True),
    "trpo": Algo(gae_advantage, critic=True, complete_episodes=False, ppo=False, trpo=True),
}


def minibatch_loss(policy: ActorCritic, mb: dict[str, Tensor], cfg: GymConfig, algo: Algo) -> tuple[Tensor, dict]:
    """The scalar loss of one minibatch of flattened steps (M,) and its statistics."""
    logp, entropy, values = policy.evaluate(mb["obs"], mb["actions"])  # (M,) each
    mask = mb["mask"]
    adv = masked_whiten(mb["adv"], mask) if cfg.whiten_advantages else mb["adv"]
    clip = cfg.clip if algo.ppo else None
    pg, clipped = policy_loss(logp, mb["logp"], adv, clip, clip)  # (M,)
    pg_loss = aggregate(pg, mask)
    ent = aggregate(entropy, mask)
    loss = pg_loss - cfg.entropy_coef * ent
    stats = {"loss/policy": pg_loss, "policy/entropy": ent, "policy/clip_frac": masked_mean(clipped, mask),
             "policy/approx_kl_k3": masked_mean(approx_kl(logp.detach(), mb["logp"]), mask)}
    if algo.critic:
        v_clip = cfg.value_clip if algo.ppo and cfg.value_clip > 0 else None  # here 0 = off (the LM backend: None)
        v_loss = aggregate(value_loss(values, mb["values"], mb["returns"], v_clip), mask)
        loss = loss + cfg.vf_coef * v_loss
        stats["loss/value"] = v_loss
    return loss, stats


def _critic_loss(policy: ActorCritic, mb: dict[str, Tensor], cfg: GymConfig, algo: Algo) -> tuple[Tensor, dict]:
    """TRPO's critic regression on one minibatch: the value loss alone (no clip), so only
    the critic gets gradients."""
    v_loss = aggregate(value_loss(policy.value(mb["obs"]), mb["values"], mb["returns"], None), mb["mask"])
    return v_loss, {"loss/value": v_loss}


def flatten(batch: Rollout, adv: Tensor, returns: Tensor) -> dict[str, Tensor]:
    """The rollout's steps (B, T) as one flat minibatch of B·T steps, with their advantages and value targets."""
    return dict(obs=batch.obs.flatten(0, 1), actions=batch.actions.flatten(0, 1), logp=batch.logp.reshape(-1),
                values=batch.values.reshape(-1), adv=adv.reshape(-1), returns=returns.reshape(-1),
                mask=batch.mask.reshape(-1))


def update(policy: ActorCritic, opt: torch.optim.Optimizer, batch: Rollout, adv: Tensor, returns: Tensor,
           cfg: GymConfig, algo: Algo) -> dict[str, float]:
    """Optimise on one rollout: ``ppo_epochs x num_minibatches`` steps for PPO, one step otherwise;
    TRPO: one natural-gradient step of the actor, then ``ppo_epochs x num_minibatches`` critic steps.

    Each minibatch is its own optimiser step, so its loss is its own token-mean."""
    flat = flatten(batch, adv, returns)
    epochs, minibatches = (cfg.ppo_epochs, cfg.num_minibatches) if algo.ppo or algo.trpo else (1, 1)
    stats: dict[str, list[float]] = defaultdict(list)
    if algo.trpo:  # the actor first, on the advantages of the values the rollout saw
        for k, v in natural_step(policy, flat, cfg).items():
            stats[k].append(v)
    loss_fn = _critic_loss if algo.trpo else minibatch_loss
    for _ in range(epochs):
        for idx in torch.randperm(len(flat["mask"])).chunk(minibatches):
            loss, mb_stats = loss_fn(policy, {k: v[idx] for k, v in flat.items()}, cfg, algo)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            for k, v in mb_stats.items():
                stats[k].append(float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    if algo.critic:
        out["value/explained_var"] = float(explained_variance(batch.values, returns, batch.mask))
    return out
