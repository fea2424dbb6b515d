"""From a scored rollout to per-token advantages: the one place the estimators differ.

``--estimator reinforce``: return-to-go per token (γ, default 1) minus a baseline.
``--estimator gae``: GAE(γ, λ = ``--gae-lambda``) over the value head's estimates. Both call the core.
"""

from __future__ import annotations

from torch import Tensor

from pg_lm.core import (
    spread_over_turns,
    turn_advantages,
    turn_index,
    turn_gae,
    turn_returns,
    batch_mean_baseline,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_std,
    kl_estimate,
    leave_one_out_baseline,
    remax_baseline,
)


def token_rewards(
    task_rewards: Tensor,  # (B, T) dense task reward (scalar rewards sit on the last token)
    mask: Tensor,  # (B, T)
    logp: Tensor | None,  # (B, T) π_old log-probs, needed for a KL penalty in the reward
    ref_logp: Tensor | None,  # (B, T)
    kl_coef: float,
    kl_estimator: str,
) -> tuple[Tensor, Tensor | None]:
    """Per-token reward ``r_t - β KL_t`` (Ziegler et al. 2019) and the per-token KL (or None)."""
    if ref_logp is None or kl_coef == 0.0:
        return task_rewards, None
    kl = kl_estimate(logp, ref_logp, kl_estimator) * mask  # (B, T)
    return task_rewards - kl_coef * kl, kl


def advantages(
    estimator: str,
    baseline: str,
    rewards: Tensor,  # (B, T) per-token rewards
    mask: Tensor,  # (B, T)
    values: Tensor | None,  # (B, T) V(s_t) from the value head, or None
    group_size: int,  # G
    gamma: float,
    lam: float,
    scale_rewards: bool = False,
    eps: float = 1e-4,
    greedy_scores: Tensor | None = None,  # (B / G,) ReMax: each prompt's greedy completion's reward
) -> tuple[Tensor, Tensor | None]:
    """-> (advantages (B, T), value targets (B, T) or None when there is no value head).

    Sequence-level baselines (batch / group mean, leave-one-out) are computed from the
    return of the whole completion ``G_0`` and subtracted from every token's
    return-to-go; with γ = 1 and no per-token rewards that is exactly GRPO/RLOO. ``remax``
    (Li et al. 2023): the task reward of the prompt's greedy completion (``greedy_scores``, no
    KL term: any baseline that depends on the prompt alone leaves the gradient unbiased).
    """
    if estimator == "gae":
        if values is None:
            raise ValueError("the gae estimator needs values from a value head")
        return gae(rewards, values, mask, gamma, lam)
    returns = discounted_returns(rewards, mask, gamma)  # (B, T)
    if baseline == "value":
        if values is None:
            raise ValueError("baseline 'value' needs values from a value head")
        return (returns - values) * mask, returns
    if baseline == "none":
        return returns, None
    g0 = returns[:, 0]  # (B,) the return of each completion
    adv = (returns - sequence_baseline(baseline, g0, group_size, greedy_scores)[:, None]) * mask  # (B, T)
    if scale_rewards:
        adv = adv / (group_std(g0, group_size)[:, None] + eps)
    return adv, None


def adaptive_kl_coef(coef: float, kl_per_seq: float, target: float, horizon: int, batch_size: int) -> float:
    """The KL coefficient after one step of the adaptive controller (Ziegler et al. 2019, section 2.2):
    ``coef * (1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon)``, which steers the KL per
    sequence toward ``target`` over ``horizon`` samples."""
    err = max(min(kl_per_seq / target - 1.0, 0.2), -0.2)
    return coef * (1.0 + err * batch_size / horizon)


def sequence_baseline(baseline: str, g0: Tensor, group_size: int, greedy_scores: Tensor | None = None) -> Tensor:
    """(B,) the baseline ``--baseline`` takes from each row's return ``g0`` (B,) (``remax``: from
    ``greedy_scores`` (B / G,), each prompt's greedy completion's reward)."""
    if baseline == "none":
        return g0 * 0
    if baseline == "batch_mean":
        return batch_mean_baseline(g0)
    if baseline == "group_mean":
        return group_mean_baseline(g0, group_size)
    if baseline == "loo":
        return leave_one_out_baseline(g0, group_size)
    if baseline == "remax":
        if greedy_scores is None:
            raise ValueError("baseline 'remax' needs the greedy completions' scores")
        return remax_baseline(g0, greedy_scores, group_size)
    raise ValueError(f"unknown baseline {baseline!r}")


def episode_advantages(credit: str, baseline: str, rewards: Tensor, mask: Tensor, turn_end: Tensor,
                       values: Tensor | None, truncated: Tensor, group_size: int, gamma: float, lam: float,
                       turn_gamma: float, turn_baseline: str, scale_rewards: bool = False,
                       eps: float = 1e-4) -> tuple[Tensor, Tensor | None]:
    """-> (advantages (B, T), value targets (B, T) or None) of episodes of many turns (``mask``: the
    action mask; ``rewards`` (B, T): each turn's reward on its last action token, KL penalties per
    token; ``turn_end`` (B, T) bool; ``truncated`` (B,) bool), as ``--credit`` says:

    * ``episode``: the episode's return minus ``--baseline`` over the group, on every action token
      (what single-completion trainers do with an episode);
    * ``turn``: each turn's return-to-go over turns (``turn_gamma``) minus the group baseline
      ``turn_baseline`` (:func:`pg_lm.core.turn_advantages`), on the turn's action tokens;
    * ``gae``: :func:`pg_lm.core.turn_gae` over action tokens (``gamma`` between tokens,
      ``turn_gamma`` between turns), bootstrapped after a truncated episode from V at its last
      action token (the value of the state it was cut in, as far as the record holds it).
    """
    if credit == "gae":
        if values is None:
            raise ValueError("--credit gae needs values from a value head")
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask != 0)  # (B, T) the last action token
        v_last = (values * last).sum(1)  # (B,)
        return turn_gae(rewards, values, mask, turn_end, v_last * truncated, gamma, turn_gamma, lam)
    if credit == "turn":
        index = turn_index(turn_end)  # (B, T) each token's turn
        K = max(int(turn_end.sum(1).max()), 1)
        turn_rewards = (rewards * mask).new_zeros(mask.shape[0], K).scatter_add_(
            1, index.clamp(max=K - 1), rewards * mask)  # (B, K)
        taken = (index.new_tensor(range(K))[None] < turn_end.sum(1, keepdim=True)).to(rewards.dtype)  # (B, K)
        adv = turn_advantages(turn_returns(turn_rewards, taken, turn_gamma), taken, group_size, turn_baseline)
        return spread_over_turns(adv, mask, turn_end), None
    g0 = (rewards * mask).sum(1)  # (B,) the episode's return
    adv = (g0 - sequence_baseline(baseline, g0, group_size))[:, None] * mask  # (B, T)
    if scale_rewards:
        adv = adv / (group_std(g0, group_size)[:, None] + eps)
    return adv, None
