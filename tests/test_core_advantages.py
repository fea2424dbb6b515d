"""pg_lm/core/advantages.py against numbers computed by hand for small cases.

Conventions under test (module docstring of advantages.py): rewards[:, t] is the reward
for the action at step t, values[:, t] = V(s_t), next_values[:, t] = V(s_{t+1});
terminated -> no bootstrap, truncated -> bootstrap from next_values, the last column
bootstraps unless terminated, masked steps give 0, and terminated=None means "the
episode terminates at the last unmasked token" (right-padded LM completions).
"""

from __future__ import annotations

import pytest
import torch

from pg_lm.core import (
    batch_mean_baseline,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_std,
    last_step_mask,
    leave_one_out_baseline,
    remax_baseline,
)

F = torch.float64


def t(rows, dtype=F):
    return torch.tensor(rows, dtype=dtype)


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(got, want, tol=1e-12):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


# ---------------------------------------------------------------- last_step_mask


def test_last_step_mask_right_padding():
    m = t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    want = b([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(last_step_mask(m), want)
    assert torch.equal(last_step_mask(m.bool()), want)


# ---------------------------------------------------------- discounted_returns: LM


def test_returns_lm_default_terminates_at_last_unmasked_token():
    # Row 0: reward 1 at its last real token (t=2); the 5 sits on padding and is ignored.
    # Row 1: completion fills the row; with terminated=None the last token is terminal,
    #        so next_values (10) must NOT be bootstrapped.
    r = t([[0, 0, 1, 5], [1, 1, 1, 1]])
    m = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    nv = torch.full_like(r, 10.0)
    want = [[0.25, 0.5, 1.0, 0.0], [1.875, 1.75, 1.5, 1.0]]  # gamma = 0.5
    close(discounted_returns(r, m, 0.5), want)
    close(discounted_returns(r, m, 0.5, next_values=nv), want)
    close(discounted_returns(r, m.bool(), 0.5), want)


def test_returns_gamma_one_is_reward_to_go():
    r = t([[1, 2, 3, 0]])
    m = t([[1, 1, 1, 0]])
    close(discounted_returns(r, m, 1.0), [[6.0, 5.0, 3.0, 0.0]])


def test_returns_float32_inputs():
    r = t([[0, 0, 1]], torch.float32)
    out = discounted_returns(r, torch.ones(1, 3), 0.9)
    assert out.dtype == torch.float32
    close(out, [[0.81, 0.9, 1.0]], tol=1e-6)


# -------------------------------------------------------- discounted_returns: gym


# One gym-style row: step 3 is an autoreset step (masked); steps 0-2 are one episode,
# step 4 starts the next and is cut by the end of the rollout. gamma = 0.9, reward 1.
GYM_R = t([[1, 1, 1, 1, 1]])
GYM_M = t([[1, 1, 1, 0, 1]])
GYM_NV = t([[100, 100, 5, 100, 7]])  # only next_values at episode ends may be used
NONE = b([[0, 0, 0, 0, 0]])


def test_returns_truncated_bootstraps_from_next_values():
    trunc = b([[0, 0, 1, 0, 0]])
    # G4 = 1 + .9*7 = 7.3 (last column bootstraps); G3 = 0 (masked);
    # G2 = 1 + .9*5 = 5.5; G1 = 1 + .9*5.5 = 5.95; G0 = 1 + .9*5.95 = 6.355
    got = discounted_returns(GYM_R, GYM_M, 0.9, terminated=NONE, truncated=trunc, next_values=GYM_NV)
    close(got, [[6.355, 5.95, 5.5, 0.0, 7.3]])


def test_returns_terminated_does_not_bootstrap():
    term = b([[0, 0, 1, 0, 1]])
    got = discounted_returns(GYM_R, GYM_M, 0.9, terminated=term, truncated=NONE, next_values=GYM_NV)
    close(got, [[2.71, 1.9, 1.0, 0.0, 1.0]])


def test_returns_terminated_wins_over_truncated_on_same_step():
    both = b([[0, 0, 1, 0, 0]])
    got = discounted_returns(GYM_R, GYM_M, 0.9, terminated=both, truncated=both, next_values=GYM_NV)
    close(got, [[2.71, 1.9, 1.0, 0.0, 7.3]])


def test_returns_truncated_without_next_values_bootstraps_zero():
    trunc = b([[0, 0, 1, 0, 0]])
    got = discounted_returns(GYM_R, GYM_M, 0.9, terminated=NONE, truncated=trunc)
    close(got, [[2.71, 1.9, 1.0, 0.0, 1.0]])


def test_returns_no_episode_end_carries_across_whole_row():
    # Nothing ends inside the row: a single episode, cut (bootstrapped) at the last column.
    r = t([[1, 0, 2]])
    nv = t([[9, 9, 4]])
    got = discounted_returns(r, torch.ones(1, 3), 0.5, terminated=b([[0, 0, 0]]), next_values=nv)
    # G2 = 2 + .5*4 = 4; G1 = 0 + .5*4 = 2; G0 = 1 + .5*2 = 2
    close(got, [[2.0, 2.0, 4.0]])


def test_returns_reward_after_episode_end_does_not_leak_back():
    # Episode ends (terminated) at t=1; the reward 8 at t=2 belongs to the next episode.
    r = t([[1, 1, 8]])
    got = discounted_returns(r, torch.ones(1, 3), 0.5, terminated=b([[0, 1, 0]]))
    close(got, [[1.5, 1.0, 8.0]])


# ------------------------------------------------------------------------------- gae


def test_gae_three_step_terminal_example():
    # gamma = .9, lam = .8; V = (.5, 1, 1.5); next_values default = (1, 1.5, 0).
    # d0 = 1 + .9*1 - .5 = 1.4; d1 = 0 + .9*1.5 - 1 = .35; d2 = 2 - 1.5 = .5 (terminal)
    # A2 = .5; A1 = .35 + .72*.5 = .71; A0 = 1.4 + .72*.71 = 1.9112
    r, v, m = t([[1, 0, 2]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, 0.9, 0.8)  # LM default: terminated at the last token
    close(adv, [[1.9112, 0.71, 0.5]])
    close(ret, [[2.4112, 1.71, 2.0]])
    adv2, _ = gae(r, v, m, 0.9, 0.8, terminated=b([[0, 0, 1]]), next_values=t([[1, 1.5, 99]]))
    close(adv2, [[1.9112, 0.71, 0.5]])


def test_gae_three_step_bootstrapped_last_column():
    # Same, but the last step is not terminal: d2 = 2 + .9*3 - 1.5 = 3.2
    # A1 = .35 + .72*3.2 = 2.654; A0 = 1.4 + .72*2.654 = 3.31088
    r, v, m = t([[1, 0, 2]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    nv = t([[1.0, 1.5, 3.0]])
    adv, ret = gae(r, v, m, 0.9, 0.8, terminated=b([[0, 0, 0]]), next_values=nv)
    close(adv, [[3.31088, 2.654, 3.2]])
    close(ret, [[3.81088, 3.654, 4.7]])


def test_gae_default_next_values_zero_after_last_column():
    # With next_values=None the value after the last column is 0 (even if not terminal).
    r, v, m = t([[1, 0, 2]]), t([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    adv, _ = gae(r, v, m, 0.9, 0.8, terminated=b([[0, 0, 0]]))
    close(adv, [[1.9112, 0.71, 0.5]])


def test_gae_truncation_inside_row():
    # Truncated at t=1: bootstrap from next_values[1] = 10 and cut the trace there.
    # d = (1+1.8-1, 1+9-2, 1+3.6-3, 1+5.4-4) = (1.8, 8, 1.6, 2.4)
    # A3 = 2.4; A2 = 1.6 + .72*2.4 = 3.328; A1 = 8; A0 = 1.8 + .72*8 = 7.56
    r, v = t([[1, 1, 1, 1]]), t([[1, 2, 3, 4]])
    nv = t([[2, 10, 4, 6]])
    adv, ret = gae(r, v, torch.ones(1, 4), 0.9, 0.8, terminated=b([[0, 0, 0, 0]]),
                   truncated=b([[0, 1, 0, 0]]), next_values=nv)
    close(adv, [[7.56, 8.0, 3.328, 2.4]])
    close(ret, [[8.56, 10.0, 6.328, 6.4]])


def test_gae_termination_and_masked_autoreset_step():
    # Terminated at t=1, t=2 is a masked autoreset step (its reward 5 is ignored),
    # t=3 starts a new episode that the rollout cuts (next_values default 0 there).
    # d0 = 1 + .9*2 - 1 = 1.8; d1 = 1 - 2 = -1; d3 = 1 + 0 - 4 = -3
    # A3 = -3; A2 = 0; A1 = -1; A0 = 1.8 + .72*(-1) = 1.08
    r, v, m = t([[1, 1, 5, 1]]), t([[1, 2, 3, 4]]), t([[1, 1, 0, 1]])
    adv, ret = gae(r, v, m, 0.9, 0.8, terminated=b([[0, 1, 0, 0]]))
    close(adv, [[1.08, -1.0, 0.0, -3.0]])
    close(ret, [[2.08, 1.0, 0.0, 1.0]])


def test_gae_right_padding_outputs_zero():
    r = t([[0, 1, 7, 7]])
    v = t([[0.5, 0.25, 3, 3]])
    m = t([[1, 1, 0, 0]])
    # terminal at t=1: d1 = 1 - .25 = .75; d0 = 0 + .5*.25 - .5 = -.375
    # A0 = -.375 + .5*.5*.75 = -.1875 (gamma = .5, lam = .5)
    adv, ret = gae(r, v, m, 0.5, 0.5)
    close(adv, [[-0.1875, 0.75, 0.0, 0.0]])
    close(ret, [[0.3125, 1.0, 0.0, 0.0]])


# ------------------------------------------------------------------------- baselines

SCORES = t([1, 0, 0, 1, 1, 1, 1, 0])  # two prompts, G = 4


def test_batch_mean_baseline():
    close(batch_mean_baseline(SCORES), [5 / 8] * 8)


def test_group_mean_baseline():
    close(group_mean_baseline(SCORES, 4), [0.5] * 4 + [0.75] * 4)
    close(group_mean_baseline(SCORES, 2), [0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.5, 0.5])


def test_group_std_is_unbiased():
    # group 1: squares sum 4 * .25 = 1 -> var 1/3; group 2: .0625*3 + .5625 = .75 -> var .25
    close(group_std(SCORES, 4), [(1 / 3) ** 0.5] * 4 + [0.5] * 4)


def test_leave_one_out_baseline():
    # b_i = (sum - s_i) / (G - 1): group sums 2 and 3
    close(leave_one_out_baseline(SCORES, 4), [1 / 3, 2 / 3, 2 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])
    # RLOO identity: s - b_loo = G/(G-1) * (s - group mean)
    close(SCORES - leave_one_out_baseline(SCORES, 4), 4 / 3 * (SCORES - group_mean_baseline(SCORES, 4)))


def test_remax_baseline_is_the_greedy_reward_of_each_prompt():
    # two prompts, G = 4: prompt 0's greedy completion scored 0.5, prompt 1's 1.0
    close(remax_baseline(SCORES, t([0.5, 1.0]), 4), [0.5] * 4 + [1.0] * 4)
    close(SCORES - remax_baseline(SCORES, t([0.5, 1.0]), 4), [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, -1.0])
    # G = 1 (the paper's setting): one sample per prompt, its own prompt's greedy reward
    close(remax_baseline(t([2.0, 3.0, 4.0]), t([1.0, 5.0, 4.0]), 1), [1.0, 5.0, 4.0])


@pytest.mark.parametrize("greedy, group_size", [([0.5], 4), ([0.5, 1.0, 2.0], 4), ([0.5, 1.0], 3)])
def test_remax_baseline_rejects_a_greedy_score_count_that_is_not_one_per_prompt(greedy, group_size):
    with pytest.raises(ValueError):
        remax_baseline(SCORES, t(greedy), group_size)


def test_group_baselines_single_group_of_two():
    s = t([3.0, 1.0])
    close(group_mean_baseline(s, 2), [2.0, 2.0])
    close(group_std(s, 2), [2**0.5, 2**0.5])
    close(leave_one_out_baseline(s, 2), [1.0, 3.0])
