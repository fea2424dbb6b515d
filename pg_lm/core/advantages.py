"""Returns, baselines and GAE: pure functions over ``(B, T)`` tensors.

Time-index convention (rlax, SB3): ``rewards[:, t]`` is the reward received for the
action taken at step ``t``; ``values[:, t] = V(s_t)``; ``next_values[:, t] = V(s_{t+1})``.

Episode structure is given by two ``(B, T)`` bool tensors:

* ``terminated[:, t]``: the episode ended at step ``t`` in a true terminal state,
  so nothing is bootstrapped (``V(s_{t+1}) = 0``).
* ``truncated[:, t]``: the episode was cut at step ``t`` (time limit) and the
  return is bootstrapped from ``next_values[:, t]`` (the value of the final
  observation), but nothing is carried over from step ``t + 1``.

The last column is always treated as a cut: it bootstraps from ``next_values[:, -1]``
unless terminated. Masked steps (``mask == 0``, e.g. Gymnasium's autoreset step or
right padding of a completion) get return and advantage 0.

For language models the defaults fit: with ``terminated=None`` every row's episode
terminates at its last unmasked token (the completion ends and its reward arrives),
unless that step is marked ``truncated``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (B, T)")


def last_step_mask(mask: Tensor) -> Tensor:
    """``(B, T)`` bool: True at the last unmasked step of each row (mask must be a prefix of ones)."""
    mask = mask.bool()
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:]
    return mask & ~nxt


def _episode_flags(rewards, mask, terminated, truncated):
    B, T = rewards.shape
    _check("mask", mask, rewards.shape)
    truncated = torch.zeros_like(mask, dtype=torch.bool) if truncated is None else truncated.bool()
    _check("truncated", truncated, rewards.shape)
    terminated = last_step_mask(mask) & ~truncated if terminated is None else terminated.bool()
    _check("terminated", terminated, rewards.shape)
    return mask.to(rewards.dtype), terminated, terminated | truncated


def discounted_returns(
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    terminated: Tensor | None = None,
    truncated: Tensor | None = None,
    next_values: Tensor | None = None,
) -> Tensor:
    """Discounted return-to-go ``G_t = r_t + γ G_{t+1}`` within an episode.

    At an episode end ``G_t = r_t + γ (1 - terminated_t) next_values_t``: a truncated
    episode (or the rollout's last column) bootstraps from ``V(s_{t+1})`` when
    ``next_values`` is given, and from 0 otherwise (plain Monte-Carlo REINFORCE,
    Williams 1992). Shapes: all ``(B, T)``; returns ``(B, T)``, 0 where masked.
    Masked steps and the bootstrap of terminated steps are selected away (``torch.where``),
    not multiplied by 0, so an inf/NaN reward or value there cannot turn into NaN.
    """
    mask, terminated, done = _episode_flags(rewards, mask, terminated, truncated)
    boot = torch.zeros_like(rewards) if next_values is None else next_values
    _check("next_values", boot, rewards.shape)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    boot = torch.where(terminated, zero, boot)
    on = mask != 0
    T = rewards.shape[1]
    out = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # (B,) G_{t+1}
    for t in reversed(range(T)):
        cut = done[:, t] | (t == T - 1)
        nxt = torch.where(cut, boot[:, t], carry)
        carry = torch.where(on[:, t], rewards[:, t] + gamma * nxt, zero)
        out[:, t] = carry
    return out


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    terminated: Tensor | None = None,
    truncated: Tensor | None = None,
    next_values: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), ``(B, T)`` -> ``(A, R)``.

    ``δ_t = r_t + γ (1 - terminated_t) V(s_{t+1}) - V(s_t)`` and
    ``A_t = δ_t + γλ (1 - done_t) A_{t+1}`` with ``done = terminated | truncated``;
    ``R_t = A_t + V(s_t)`` are the λ-returns (the value targets). ``next_values``
    defaults to ``values`` shifted left with 0 after the last column.
    λ = 1 gives ``discounted_returns(...) - V``; λ = 0 gives the TD error ``δ_t``.
    Both outputs are 0 where masked; as in ``discounted_returns``, masked steps and the
    bootstrap of terminated steps are selected away, so inf/NaN there cannot leak.
    """
    _check("values", values, rewards.shape)
    mask, terminated, done = _episode_flags(rewards, mask, terminated, truncated)
    if next_values is None:
        next_values = torch.zeros_like(values)
        next_values[:, :-1] = values[:, 1:]
    _check("next_values", next_values, rewards.shape)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    on = mask != 0
    delta = torch.where(on, rewards + gamma * torch.where(terminated, zero, next_values) - values, zero)  # (B, T)
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}, finite: 0 at masked steps
    for t in reversed(range(T)):
        cont = (~done[:, t]).to(rewards.dtype) if t < T - 1 else 0.0
        carry = torch.where(on[:, t], delta[:, t] + gamma * lam * cont * carry, zero)
        adv[:, t] = carry
    return adv, torch.where(on, adv + values, zero)


# Baselines over sequence-level scores. ``scores`` is (B,) with the G samples of a
# prompt contiguous (B = number of prompts x G). Each returns a (B,) baseline b so
# that the advantage is ``returns - b[:, None]``.


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)  # (B / G, G)


def _shifted(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(shift, g - shift)`` with the first member of each group (row) as the shift.

    Statistics of ``g - shift`` round in proportion to the group's spread, not to
    ``|g|``: rewards of 1e6 with small differences keep them, and an all-equal group
    gives exactly 0 differences, hence a baseline exactly equal to its scores
    (advantage 0) and a std of exactly 0.
    """
    shift = g[..., :1]
    return shift, g - shift


def batch_mean_baseline(scores: Tensor) -> Tensor:
    """The mean score of the whole batch, for every sample: ``b_i = mean_j s_j``. (B,) -> (B,).

    Computed as ``s_0 + mean_j (s_j - s_0)`` (see ``_shifted``): an all-equal batch gets
    advantage exactly 0.
    """
    shift, d = _shifted(scores)
    return (shift + d.mean()).expand_as(scores)


def group_mean_baseline(scores: Tensor, group_size: int) -> Tensor:
    """GRPO (Shao et al. 2024): the mean of the G samples of the same prompt. (B,) -> (B,).

    Computed as ``s_0 + mean_j (s_j - s_0)`` per group (see ``_shifted``): an all-equal
    group, and every group of G = 1, gets advantage exactly 0.
    """
    shift, d = _shifted(_groups(scores, group_size))
    return (shift + d.mean(1, keepdim=True)).expand(-1, group_size).reshape(-1)


def group_std(scores: Tensor, group_size: int) -> Tensor:
    """Unbiased std of the G samples of the same prompt (GRPO's advantage scale). (B,) -> (B,).

    Computed on ``s - s_0`` (see ``_shifted``): exactly 0 for an all-equal group, and
    accurate for 1e6 + small differences, where the plain std's mean already carries a
    rounding error of the size of those differences.
    """
    if group_size < 2:
        raise ValueError("a group std needs group_size >= 2")
    _, d = _shifted(_groups(scores, group_size))
    return d.std(1, keepdim=True).expand(-1, group_size).reshape(-1)


def leave_one_out_baseline(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): ``b_i = (sum_j s_j - s_i) / (G - 1)`` within a group. (B,) -> (B,).

    G = 1 has no other sample to compare with and is refused. Computed on ``s - s_0``
    (see ``_shifted``): an all-equal group gets advantage exactly 0.
    """
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs group_size >= 2")
    shift, d = _shifted(_groups(scores, group_size))
    return (shift + (d.sum(1, keepdim=True) - d) / (group_size - 1)).reshape(-1)


def remax_baseline(scores: Tensor, greedy_scores: Tensor, group_size: int) -> Tensor:
    """ReMax (Li et al. 2023, "ReMax: a simple, effective, and efficient reinforcement learning
    method for aligning large language models", Algorithm 1): the baseline of each sampled
    completion is the reward of the greedy (argmax-decoded) completion of the same prompt,
    ``b_i = r(x, ŷ_greedy(x))``. It depends on the prompt only, not on the sample, so the
    gradient stays unbiased; it needs no value head and works with G = 1 (the paper's setting).

    ``scores`` (B,) the sampled completions' scores (G consecutive per prompt), ``greedy_scores``
    (B / G,) one per prompt, in the same prompt order -> (B,).
    """
    _groups(scores, group_size)
    if greedy_scores.shape != (scores.numel() // group_size,):
        raise ValueError(f"greedy_scores has shape {tuple(greedy_scores.shape)}, expected "
                         f"({scores.numel() // group_size},) (B / G, one per prompt)")
    return greedy_scores.to(scores.dtype).repeat_interleave(group_size)  # (B,)


def zero_spread_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO (Yu et al. 2025, "DAPO: an open-source LLM RL system at scale", eq. 11, dynamic sampling):
    which groups' G scores all agree (max == min). Under a group baseline their advantages are all 0,
    so they carry no gradient. (B,) -> (B / G,) bool."""
    g = _groups(scores, group_size)
    return g.amax(1) == g.amin(1)
