"""Credit assignment over episodes of many turns: pure functions over ``(B, T)`` and ``(B, K)`` tensors.

A multi-turn episode is one row of T tokens after the prompt: turns of action tokens (sampled by the
policy) interleaved with observation tokens (written by the environment), with one ``action_mask``
(B, T), 1 where the policy sampled. Each turn's reward sits on its last action token
(``turn_end`` (B, T) bool marks those). K is the most turns of any row.

* :func:`turn_gae` -- GAE with a value per action token, observations compressed out: the step
  after a turn's last action token is the next turn's first action token, discounted by the turn
  discount instead of the token one; the episode's last action token bootstraps from
  ``bootstrap`` (B,): 0 when the episode terminated, V of the state it was cut in when truncated.
* :func:`turn_returns` -- each turn's discounted return-to-go over turns, (B, K).
* :func:`turn_advantages` -- those returns minus a group baseline, taken over the episodes of the
  group (the same start) or over the same turn index; spread onto the turn's action tokens by
  :func:`spread_over_turns`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def compress(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(``x``'s entries at ``mask``'s 1s moved to the left of each row in order, the permutation
    ``order`` (B, T) that did it): ``compressed = x.gather(1, order)``; the first ``mask.sum(1)``
    columns of a row are its masked-in entries."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # (B, T)
    return x.gather(1, order), order


def turn_gae(rewards: Tensor, values: Tensor, action_mask: Tensor, turn_end: Tensor, bootstrap: Tensor,
             gamma_token: float, gamma_turn: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over the action tokens of multi-turn episodes, ``(B, T)`` -> ``(A, R)``.

    Over a row's action tokens a_0 .. a_{n-1} in order (observations compressed out), with ``d_k``
    the turn discount ``gamma_turn`` after a turn's last action token (and after a_{n-1}) and the
    token discount ``gamma_token`` within a turn::

        δ_k = r_k + d_k V_{k+1} - V_k,   V_n = bootstrap    (0 when the episode terminated)
        A_k = δ_k + d_k λ A_{k+1},        A_n = 0
        R_k = A_k + V_k                                      (the value targets)

    ``rewards`` (B, T): each turn's reward on its last action token; ``values`` (B, T): V before each
    action token (read at action tokens only); ``turn_end`` (B, T) bool; ``bootstrap`` (B,). Both
    outputs are 0 at observation, prompt and padding positions, whatever ``values`` holds there.
    With one turn and no observations it is :func:`pg_lm.core.gae` with ``gamma_token``.
    """
    shape = rewards.shape
    for name, x in (("values", values), ("action_mask", action_mask), ("turn_end", turn_end)):
        _check(name, x, shape)
    _check("bootstrap", bootstrap, shape[:1])
    on = action_mask != 0
    r, order = compress(torch.where(on, rewards, 0.0), on)  # (B, T), action tokens first
    v, end = values.gather(1, order), turn_end.gather(1, order)  # (B, T)
    n = on.sum(1)  # (B,) action tokens per row
    k = torch.arange(shape[1], device=rewards.device)
    live, last = k < n[:, None], k == (n - 1)[:, None]  # (B, T)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    next_v = torch.where(last, bootstrap[:, None].to(rewards.dtype), torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1))
    scalar = lambda x: torch.tensor(x, dtype=rewards.dtype, device=rewards.device)  # noqa: E731
    d = torch.where(end | last, scalar(gamma_turn), scalar(gamma_token))  # (B, T) discount after step k
    delta = torch.where(live, r + d * torch.where(live, next_v, zero) - torch.where(live, v, zero), zero)
    adv_c = torch.zeros_like(delta)
    carry = torch.zeros_like(delta[:, 0])  # (B,) A_{k+1}
    for j in reversed(range(shape[1])):
        carry = torch.where(live[:, j], delta[:, j] + d[:, j] * lam * carry, zero)
        adv_c[:, j] = carry
    adv = torch.zeros_like(adv_c).scatter_(1, order, adv_c)  # back to the token positions
    return adv, torch.where(on, adv + torch.where(on, values, zero), zero)


def turn_returns(turn_rewards: Tensor, turn_mask: Tensor, gamma_turn: float) -> Tensor:
    """Each turn's discounted return-to-go over the turns of its episode, ``(B, K)`` -> ``(B, K)``:
    ``G_k = r_k + γ_turn G_{k+1}``, 0 where ``turn_mask`` is 0 (turns a row did not take)."""
    _check("turn_mask", turn_mask, turn_rewards.shape)
    on = turn_mask != 0
    zero = torch.zeros((), dtype=turn_rewards.dtype, device=turn_rewards.device)
    out = torch.zeros_like(turn_rewards)
    carry = torch.zeros_like(turn_rewards[:, 0])
    for k in reversed(range(turn_rewards.shape[1])):
        carry = torch.where(on[:, k], turn_rewards[:, k] + gamma_turn * carry, zero)
        out[:, k] = carry
    return out


def turn_advantages(returns: Tensor, turn_mask: Tensor, group_size: int, baseline: str = "episode") -> Tensor:
    """Per-turn returns ``(B, K)`` minus a group baseline, ``(B, K)``; 0 on turns not taken.

    ``episode``: the mean over the group's *other* episodes of their first turn's return (RLOO over
    episodes from the same start), the same for every turn of an episode -- unbiased whatever the
    episode lengths. ``turn_index``: the leave-one-out mean of the returns at the same turn index
    among the group's episodes that reached it (0 where none other did) -- lower variance for the
    later turns, but biased when the policy decides how long an episode lasts, since which episodes
    reach turn k depends on the actions being scored.
    """
    _check("turn_mask", turn_mask, returns.shape)
    B, K = returns.shape
    if group_size < 2 or B % group_size:
        raise ValueError(f"turn advantages need groups of >= 2 episodes dividing B = {B}, got {group_size}")
    on = (turn_mask != 0).to(returns.dtype)
    g_ret, g_on = returns.view(-1, group_size, K) * on.view(-1, group_size, K), on.view(-1, group_size, K)
    if baseline == "episode":
        first = g_ret[:, :, 0]  # (groups, G)
        b = ((first.sum(1, keepdim=True) - first) / (group_size - 1)).reshape(B, 1)  # (B, 1)
        return (returns - b) * on
    if baseline == "turn_index":
        others = (g_on.sum(1, keepdim=True) - g_on).reshape(B, K)  # (B, K) episodes besides this one at turn k
        total = (g_ret.sum(1, keepdim=True) - g_ret).reshape(B, K)
        b = torch.where(others > 0, total / others.clamp(min=1), torch.zeros_like(total))
        return (returns - b) * on
    raise ValueError(f"baseline must be 'episode' or 'turn_index', got {baseline!r}")


def turn_index(turn_end: Tensor) -> Tensor:
    """``(B, T)`` the turn each token belongs to: how many turn ends came strictly before it."""
    ends = turn_end.long()
    return torch.cumsum(ends, 1) - ends


def spread_over_turns(turn_values: Tensor, action_mask: Tensor, turn_end: Tensor) -> Tensor:
    """``(B, K)`` per-turn values onto the ``(B, T)`` action tokens of each turn (turn k's tokens are
    those after turn k-1's last action token up to its own); 0 elsewhere."""
    on = action_mask != 0
    index = turn_index(turn_end).clamp(max=turn_values.shape[1] - 1)  # (B, T)
    return torch.where(on, turn_values.gather(1, index), torch.zeros((), dtype=turn_values.dtype,
                                                                     device=turn_values.device))
