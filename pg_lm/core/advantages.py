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
    """
    mask, terminated, done = _episode_flags(rewards, mask, terminated, truncated)
    boot = torch.zeros_like(rewards) if next_values is None else next_values
    _check("next_values", boot, rewards.shape)
    boot = boot * (~terminated).to(rewards.dtype)
    T = rewards.shape[1]
    out = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # (B,) G_{t+1}
    for t in reversed(range(T)):
        cut = done[:, t] | (t == T - 1)
        nxt = torch.where(cut, boot[:, t], carry)
        carry = (rewards[:, t] + gamma * nxt) * mask[:, t]
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
    Both outputs are 0 where masked.
    """
    _check("values", values, rewards.shape)
    mask, terminated, done = _episode_flags(rewards, mask, terminated, truncated)
    if next_values is None:
        next_values = torch.zeros_like(values)
        next_values[:, :-1] = values[:, 1:]
    _check("next_values", next_values, rewards.shape)
    delta = rewards + gamma * next_values * (~terminated).to(rewards.dtype) - values  # (B, T)
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(T)):
        cont = (~done[:, t]).to(rewards.dtype) if t < T - 1 else 0.0
        carry = (delta[:, t] + gamma * lam * cont * carry) * mask[:, t]
        adv[:, t] = carry
    return adv, (adv + values) * mask


# Baselines over sequence-level scores. ``scores`` is (B,) with the G samples of a
# prompt contiguous (B = number of prompts x G). Each returns a (B,) baseline b so
# that the advantage is ``returns - b[:, None]``.


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)  # (B / G, G)


def batch_mean_baseline(scores: Tensor) -> Tensor:
    """The mean score of the whole batch, for every sample: ``b_i = mean_j s_j``. (B,) -> (B,)."""
    return scores.mean().expand_as(scores)


def group_mean_baseline(scores: Tensor, group_size: int) -> Tensor:
    """GRPO (Shao et al. 2024): the mean of the G samples of the same prompt. (B,) -> (B,)."""
    return _groups(scores, group_size).mean(1, keepdim=True).expand(-1, group_size).reshape(-1)


def group_std(scores: Tensor, group_size: int) -> Tensor:
    """Unbiased std of the G samples of the same prompt (GRPO's advantage scale). (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError("a group std needs group_size >= 2")
    return _groups(scores, group_size).std(1, keepdim=True).expand(-1, group_size).reshape(-1)


def leave_one_out_baseline(scores: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): ``b_i = (sum_j s_j - s_i) / (G - 1)`` within a group. (B,) -> (B,)."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs group_size >= 2")
    g = _groups(scores, group_size)
    return ((g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def zero_spread_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO (Yu et al. 2025, "DAPO: an open-source LLM RL system at scale", eq. 11, dynamic sampling):
    which groups' G scores all agree (max == min). Under a group baseline their advantages are all 0,
    so they carry no gradient. (B,) -> (B / G,) bool."""
    g = _groups(scores, group_size)
    return g.amax(1) == g.amin(1)
