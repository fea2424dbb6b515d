"""Multi-turn credit (pg_lm/core/turns.py) against plain loops over the expanded episodes:
GAE over action tokens with observations compressed out (turn and token discounts, the bootstrap
after the last turn), per-turn returns, and the two group baselines over turns."""

from __future__ import annotations

import pytest
import torch

from pg_lm.core import gae
from pg_lm.core.turns import compress, spread_over_turns, turn_advantages, turn_gae, turn_returns


def random_episodes(B=5, T=17, seed=0):
    """Rows of turns (1-4 action tokens) and observations (0-3 tokens), then padding; each turn's
    reward on its last action token; values everywhere (NaN off the action tokens)."""
    g = torch.Generator().manual_seed(seed)
    mask, end = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        t = 0
        while True:
            n = int(torch.randint(1, 5, (1,), generator=g))
            if t + n > T - 2:
                break
            mask[b, t : t + n] = 1
            end[b, t + n - 1] = True
            t += n + int(torch.randint(0, 4, (1,), generator=g))
    rewards = torch.where(end, torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    values = torch.where(mask.bool(), torch.randn(B, T, generator=g, dtype=torch.float64), torch.nan)
    bootstrap = torch.randn(B, generator=g, dtype=torch.float64) * (torch.rand(B, generator=g) < 0.5)
    return rewards, values, mask, end, bootstrap


def reference_turn_gae(rewards, values, mask, end, bootstrap, gt, gu, lam):
    """The definition, one token at a time over each row's action tokens."""
    A, R = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[b, t]]
        carry = 0.0
        for i in reversed(range(len(pos))):
            t, last = pos[i], i == len(pos) - 1
            d = gu if (bool(end[b, t]) or last) else gt
            nv = float(bootstrap[b]) if last else float(values[b, pos[i + 1]])
            carry = float(rewards[b, t]) + d * nv - float(values[b, t]) + d * lam * carry
            A[b, t], R[b, t] = carry, carry + float(values[b, t])
    return A, R


@pytest.mark.parametrize("gt, gu, lam", [(1.0, 1.0, 0.95), (0.99, 0.9, 0.9), (1.0, 0.5, 0.0), (0.9, 1.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_turn_gae_equals_the_expanded_reference(gt, gu, lam, seed):
    r, v, m, e, boot = random_episodes(seed=seed)
    A, R = turn_gae(r, v, m, e, boot, gt, gu, lam)
    A_ref, R_ref = reference_turn_gae(r, v, m, e, boot, gt, gu, lam)
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(R, R_ref)
    assert torch.isfinite(A).all() and (A[m == 0] == 0).all() and (R[m == 0] == 0).all()  # NaN values off the actions


def test_one_turn_without_observations_is_plain_gae():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 3, 8])
    mask = (torch.arange(8) < lengths[:, None]).double()
    end = (torch.arange(8) == (lengths - 1)[:, None])
    r = torch.where(end, torch.randn(3, 8, generator=g, dtype=torch.float64), 0.0)
    v = torch.randn(3, 8, generator=g, dtype=torch.float64) * mask
    A, R = turn_gae(r, v, mask, end, torch.zeros(3, dtype=torch.float64), 0.97, 0.5, 0.9)
    A_ref, R_ref = gae(r, v, mask, 0.97, 0.9)  # terminated at each row's last token
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(R, R_ref)


def test_observations_are_compressed_out_and_the_turn_discount_crosses_them():
    """Two turns of one token each with an observation between: A_0 = r_0 + γ_turn V_1 - V_0 + γ_turn λ A_1."""
    r = torch.tensor([[1.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 99.0, 99.0, 0.25]], dtype=torch.float64)  # 99: observation positions, never read
    m = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    e = torch.tensor([[True, False, False, True]])
    A, _ = turn_gae(r, v, m, e, torch.tensor([0.0], dtype=torch.float64), 1.0, 0.5, 0.8)
    a1 = 2.0 + 0.5 * 0.0 - 0.25
    a0 = 1.0 + 0.5 * 0.25 - 0.5 + 0.5 * 0.8 * a1
    torch.testing.assert_close(A, torch.tensor([[a0, 0.0, 0.0, a1]], dtype=torch.float64))
    # truncated instead: the last turn bootstraps from V of the state it was cut in
    A, _ = turn_gae(r, v, m, e, torch.tensor([3.0], dtype=torch.float64), 1.0, 0.5, 0.8)
    assert float(A[0, 3]) == pytest.approx(2.0 + 0.5 * 3.0 - 0.25)


def test_compress_keeps_order_and_spread_puts_each_turn_on_its_tokens():
    x = torch.tensor([[10, 11, 12, 13, 14]])
    m = torch.tensor([[0, 1, 0, 1, 1]])
    c, order = compress(x, m)
    assert c[0, :3].tolist() == [11, 13, 14] and torch.equal(x.gather(1, order), c)
    e = torch.tensor([[False, True, False, False, True]])
    out = spread_over_turns(torch.tensor([[7.0, 9.0]]), m, e)
    assert out.tolist() == [[0.0, 7.0, 0.0, 9.0, 9.0]]


def test_turn_returns_discount_over_turns():
    r = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert turn_returns(r, m, 0.5).tolist() == [[1.5, 1.0, 2.0], [3.5, 1.0, 0.0]]


def test_turn_baselines_over_episodes_and_over_turn_index():
    ret = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    ep = turn_advantages(ret, m, group_size=2, baseline="episode")
    # group 1: episodes 0 and 1, baselines = the other's first-turn return
    assert ep[0].tolist() == [2.0, 1.0, 0.0] and ep[1].tolist() == [-2.0, 0.0, 0.0]
    ti = turn_advantages(ret, m, group_size=2, baseline="turn_index")
    # episode 0's turns 1 and 2: no other episode of its group reached them, so no baseline
    assert ti[0].tolist() == [2.0, 2.0, 1.0] and ti[1].tolist() == [-2.0, 0.0, 0.0]
    assert ti[2].tolist() == [-3.0, -4.0, 0.0] and ti[3].tolist() == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="groups of >= 2"):
        turn_advantages(ret, m, group_size=3)
    with pytest.raises(ValueError, match="'episode' or 'turn_index'"):
        turn_advantages(ret, m, group_size=2, baseline="other")


def test_shapes_are_checked():
    r, v, m, e, boot = random_episodes()
    with pytest.raises(ValueError, match="bootstrap has shape"):
        turn_gae(r, v, m, e, boot[:2], 1.0, 1.0, 0.9)
    with pytest.raises(ValueError, match="values has shape"):
        turn_gae(r, v[:, :3], m, e, boot, 1.0, 1.0, 0.9)


def test_per_turn_credit_undiscounted_with_one_final_reward_is_the_episodes():
    """With γ_turn = 1 and a reward only on the last turn (guess-the-number), every turn's return-to-go
    is the episode's return, and the per-turn advantage over the episodes' leave-one-out baseline
    is the episode-level RLOO advantage; a discount makes them differ (the turns nearer the end
    get more)."""
    from pg_lm.lm.estimate import episode_advantages

    rewards, _, mask, end, _ = random_episodes(B=6, T=17, seed=3)
    last = end & (end.long().flip(1).cumsum(1).flip(1) == 1)  # (B, T) each row's last turn end
    rewards = torch.where(last, rewards, 0.0).float()
    truncated = torch.zeros(6, dtype=torch.bool)
    args = (rewards, mask, end, None, truncated, 3, 1.0, 0.95)
    ep, _ = episode_advantages("episode", "loo", *args, 1.0, "episode")
    turn, _ = episode_advantages("turn", "loo", *args, 1.0, "episode")
    torch.testing.assert_close(turn, ep)
    discounted, _ = episode_advantages("turn", "loo", *args, 0.8, "episode")
    assert not torch.allclose(discounted, ep)
