"""``pg_lm.lm.estimate`` (rollout -> per-token advantages) against hand-computed numbers.

Batch used throughout: one group of G = 4 completions with lengths 3, 2, 4, 1 tokens and
terminal scores s = [1, 0, 0, 1] on each completion's last token (γ = 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.lm import estimate
from pg_lm.core import explained_variance, masked_whiten

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

F = torch.float64
LENGTHS = [3, 2, 4, 1]
SCORES = [1.0, 0.0, 0.0, 1.0]


def mask_of(lengths, T=4):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).to(F)  # (B, T)


def terminal(scores, lengths, T=4):
    r = torch.zeros(len(scores), T, dtype=F)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        r[i, n - 1] = s
    return r


MASK = mask_of(LENGTHS)
REWARDS = terminal(SCORES, LENGTHS)


def adv(baseline, rewards=REWARDS, mask=MASK, values=None, G=4, gamma=1.0, lam=1.0, scale=False, estimator="reinforce"):
    return estimate.advantages(estimator, baseline, rewards, mask, values, G, gamma, lam, scale_rewards=scale)


def per_row(values_per_row, mask=MASK):
    """A (B, T) tensor holding values_per_row[i] on every valid token of row i, 0 on padding."""
    return torch.tensor(values_per_row, dtype=F)[:, None] * mask


def test_leave_one_out_by_hand():
    a, ret = adv("loo")
    # b_i = (sum - s_i) / 3: s = 1 -> b = 1/3, A = 2/3; s = 0 -> b = 2/3, A = -2/3
    want = per_row([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    torch.testing.assert_close(a, want)
    assert ret is None
    assert (a[MASK == 0] == 0).all()


def test_group_mean_by_hand_with_and_without_scaling():
    a, _ = adv("group_mean")
    torch.testing.assert_close(a, per_row([0.5, -0.5, -0.5, 0.5]))
    a, _ = adv("group_mean", scale=True)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(a, per_row([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))


def test_groups_are_separate_and_batch_mean_is_global():
    lengths = LENGTHS + [1, 2, 3, 4]
    mask, rewards = mask_of(lengths), terminal(SCORES + [2.0, 2.0, 2.0, 4.0], lengths)
    a, _ = adv("group_mean", rewards, mask)
    torch.testing.assert_close(a, per_row([0.5, -0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 1.5], mask))
    a, _ = adv("loo", rewards, mask)
    torch.testing.assert_close(a, per_row([2 / 3, -2 / 3, -2 / 3, 2 / 3, -2 / 3, -2 / 3, -2 / 3, 2.0], mask))
    a, _ = adv("batch_mean", rewards, mask)  # mean of all 8 scores = 1.5
    torch.testing.assert_close(a, per_row([-0.5, -1.5, -1.5, -0.5, 0.5, 0.5, 0.5, 2.5], mask))


def test_no_baseline_is_the_return_to_go():
    a, ret = adv("none")
    torch.testing.assert_close(a, per_row(SCORES))
    assert ret is None
    # dense rewards: the return at t sums rewards from t on
    dense = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=F)
    a, _ = adv("none", dense, mask_of([3]), G=1)
    torch.testing.assert_close(a, torch.tensor([[6.0, 5.0, 3.0, 0.0]], dtype=F))


def test_discount_is_applied_per_token_before_the_baseline():
    # γ = 0.5: return_t = 0.5^(L-1-t) s; the baseline uses each completion's G_0
    a, _ = adv("loo", gamma=0.5)
    g = [[0.25, 0.5, 1.0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1.0, 0, 0, 0]]
    g0 = [0.25, 0.0, 0.0, 1.0]
    b = [(sum(g0) - x) / 3 for x in g0]
    want = (torch.tensor(g, dtype=F) - torch.tensor(b, dtype=F)[:, None]) * MASK
    torch.testing.assert_close(a, want)


def test_value_baseline_is_returns_minus_values():
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0], [0.0, 1.0, 2.0, 3.0], [-1.0, 9.0, 9.0, 9.0]], dtype=F)
    a, ret = adv("value", values=values)
    torch.testing.assert_close(ret, per_row(SCORES))
    torch.testing.assert_close(a, (per_row(SCORES) - values) * MASK)
    assert (a[MASK == 0] == 0).all()
    with pytest.raises(ValueError, match="value head"):
        adv("value")


def test_gae_by_hand():
    rewards, mask = torch.tensor([[0.0, 0.0, 1.0]], dtype=F), torch.ones(1, 3, dtype=F)
    values = torch.full((1, 3), 0.5, dtype=F)
    a, ret = adv("loo", rewards, mask, values, G=1, lam=1.0, estimator="gae")  # λ = 1: R - V
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.5, 0.5]], dtype=F))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]], dtype=F))
    a, ret = adv("loo", rewards, mask, values, G=1, lam=0.0, estimator="gae")  # λ = 0: TD errors
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.0, 0.5]], dtype=F))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 0.5, 1.0]], dtype=F))
    # padding: the episode ends at the last real token, nothing leaks from padded values
    values = torch.tensor([[0.5, 0.5, 7.0]], dtype=F)
    a, _ = adv("loo", torch.tensor([[0.0, 1.0, 0.0]], dtype=F), mask_of([2], 3), values, G=1, lam=0.0, estimator="gae")
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.5, 0.0]], dtype=F))
    with pytest.raises(ValueError, match="value head"):
        adv("loo", estimator="gae")


def test_unknown_baseline_is_an_error():
    with pytest.raises(ValueError, match="nope"):
        adv("nope")


def test_token_rewards_subtracts_the_kl_penalty_on_real_tokens():
    task = terminal(SCORES, LENGTHS)
    logp = torch.full((4, 4), -1.0, dtype=F)
    ref = torch.full((4, 4), -1.5, dtype=F)
    r, kl = estimate.token_rewards(task, MASK, logp, ref, 0.0, "k1")
    assert r is task and kl is None
    r, kl = estimate.token_rewards(task, MASK, logp, None, 0.1, "k1")
    assert r is task and kl is None
    r, kl = estimate.token_rewards(task, MASK, logp, ref, 0.1, "k1")
    torch.testing.assert_close(kl, 0.5 * MASK)  # k1 = logp - ref_logp
    torch.testing.assert_close(r, task - 0.05 * MASK)


def test_explained_variance_and_whitening():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=F)
    m = mask_of([3])
    assert float(explained_variance(ret, ret, m)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros_like(ret), ret, m)) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), m))
    w = masked_whiten(ret, m)  # what --whiten-advantages applies
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=F), atol=1e-6, rtol=0)
