"""Stable-Baselines3's infinite-horizon check (tests/test_gae.py, InfiniteHorizonEnv), for the core.

An environment that never terminates pays reward 1 on every step and is only ever cut
by a time limit. Its true value is 1 / (1 - gamma) in every state (10 for gamma = 0.9).
Fitting V to the lambda-returns from `gae` must find that value when the time limit is
passed as `truncated` (bootstrapped from V of the final observation), and something
clearly smaller, the finite-horizon value, when the same steps are passed as `terminated`.

Deterministic and fast: the value function is a table over the env's 4 states (a
linear model on one-hot features) and is fitted by iterating its least-squares solution,
V(s) <- mean of the lambda-returns R_t over the steps with s_t = s, to a fixed point.
"""

from __future__ import annotations

import pytest
import torch

from pg_lm.core import gae

GAMMA, H, N_STATES, T = 0.9, 10, 4, 30  # time limit H, rollout length T
F = torch.float64


def rollout(offsets, next_step_autoreset):
    """(B, T) obs, next_obs, mask, time_limit for the cyclic env s_{k+1} = (s_k + 1) mod 4.

    ``offsets[b]``: steps env b's current episode has already run at t = 0.
    ``next_step_autoreset``: Gymnasium >= 1.0 style, the step after an episode end is a
    reset step whose action is ignored (mask 0); otherwise SB3 style (reset within the step).
    """
    B = len(offsets)
    obs = torch.zeros(B, T, dtype=torch.long)
    next_obs = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, T, dtype=F)
    limit = torch.zeros(B, T, dtype=torch.bool)
    for b, k in enumerate(offsets):
        pending_reset = False
        for t in range(T):
            if pending_reset:
                mask[b, t], k, pending_reset = 0.0, 0, False
                continue
            obs[b, t] = k % N_STATES
            k += 1
            next_obs[b, t] = k % N_STATES  # the final observation at a time limit, too
            if k == H:
                limit[b, t] = True
                if next_step_autoreset:
                    pending_reset = True
                else:
                    k = 0
    return obs, next_obs, mask, limit


def lambda_returns(V, roll, lam, time_limit_as):
    obs, next_obs, mask, limit = roll
    none = torch.zeros_like(limit)
    flags = dict(terminated=limit, truncated=none) if time_limit_as == "terminated" \
        else dict(terminated=none, truncated=limit)
    rewards = mask.clone()  # reward 1 on every real step
    return gae(rewards, V[obs] * mask, mask, GAMMA, lam, next_values=V[next_obs], **flags)


def fit_values(roll, lam, time_limit_as, max_iters=400, tol=1e-9):
    obs, _, mask, _ = roll
    real = mask.bool()
    counts = torch.zeros(N_STATES, dtype=F).index_add_(0, obs[real], torch.ones(int(real.sum()), dtype=F))
    V = torch.zeros(N_STATES, dtype=F)
    for _ in range(max_iters):
        _, R = lambda_returns(V, roll, lam, time_limit_as)
        V_new = torch.zeros(N_STATES, dtype=F).index_add_(0, obs[real], R[real]) / counts
        V, step = V_new, (V_new - V).abs().max().item()
        if step < tol:
            return V
    raise AssertionError(f"the fixed-point iteration did not converge (last step {step})")


ROLLOUTS = {
    "sb3-reset": dict(offsets=[0, 3, 7], next_step_autoreset=False),
    "next-step-autoreset": dict(offsets=[0, 5, 9], next_step_autoreset=True),
}


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("layout", list(ROLLOUTS))
def test_value_converges_to_infinite_horizon_value_only_when_truncated(layout, lam):
    roll = rollout(**ROLLOUTS[layout])
    target = 1.0 / (1.0 - GAMMA)  # 10

    V_trunc = fit_values(roll, lam, "truncated")
    torch.testing.assert_close(V_trunc, torch.full((N_STATES,), target, dtype=F), rtol=1e-3, atol=0.0)

    V_term = fit_values(roll, lam, "terminated")
    assert V_term[0] < 0.8 * target, f"V(s0) = {V_term[0]:.3f} with the time limit as termination"


def test_terminated_time_limit_gives_the_finite_horizon_value():
    # One env, episodes aligned with the rollout (T = 3 H), lambda = 1: no bootstrapping at
    # all, so V(s0) is the mean Monte-Carlo return over the visits of s0, which are at
    # episode steps k = 0, 4, 8 with 10, 6 and 2 rewards left: sum_j 0.9^j over each.
    roll = rollout([0], next_step_autoreset=False)
    V = fit_values(roll, 1.0, "terminated")
    mc = [(1 - GAMMA**n) / (1 - GAMMA) for n in (10, 6, 2)]  # 6.5132, 4.6856, 1.9
    assert abs(V[0].item() - sum(mc) / 3) < 1e-9  # 4.36627


@pytest.mark.parametrize("layout", list(ROLLOUTS))
def test_true_value_is_a_fixed_point_only_when_truncated(layout):
    roll = rollout(**ROLLOUTS[layout])
    mask = roll[2]
    V = torch.full((N_STATES,), 10.0, dtype=F)
    adv, ret = lambda_returns(V, roll, 0.95, "truncated")
    torch.testing.assert_close(adv, torch.zeros_like(adv), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, 10.0 * mask, atol=1e-12, rtol=0)
    adv, _ = lambda_returns(V, roll, 0.95, "terminated")
    # at a time limit treated as terminal: A = 1 - V = -9
    assert torch.allclose(adv[roll[3]], torch.tensor(-9.0, dtype=F))
