"""The loss variants in pg_lm/core against hand-computed numbers: GSPO's
sequence-level ratio, dual-clip PPO, the clip fractions, global (REINFORCE++) whitening, DAPO's
zero-spread groups and the sampler-learner importance weights."""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.core import (
    clip_fractions,
    log_ratio,
    masked_whiten,
    policy_loss,
    sampler_is_weights,
    sampler_log_ratio,
    zero_spread_groups,
)
from pg_lm.core.losses import aggregate
from pg_lm.lm.estimate import advantages as lm_advantages

F = torch.float64
L = math.log


def t(rows):
    return torch.tensor(rows, dtype=F)


def close(got, want, tol=1e-12):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


# two completions: row 0 has 2 tokens (π/π_old = 2 and 1), row 1 has 1 token (π/π_old = 1/2); col 2 is padding
LOGP = t([[L(0.5), L(0.5), -3.0], [L(0.25), -9.0, -9.0]])
OLD = t([[L(0.25), L(0.5), -1.0], [L(0.5), -2.0, -2.0]])
MASK = t([[1, 1, 0], [1, 0, 0]])
ADV = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
S0, S1 = math.sqrt(2.0), 0.5  # GSPO: s_0 = (2 * 1)^(1/2), s_1 = 1/2


# ----------------------------------------------------------------------- GSPO


def test_sequence_log_ratio_is_the_length_normalised_log_ratio_on_every_token():
    close(log_ratio(LOGP, OLD, MASK, "token"), LOGP - OLD)
    lr = log_ratio(LOGP, OLD, MASK, "sequence")
    close(lr.exp() * MASK, [[S0, S0, 0.0], [S1, 0.0, 0.0]])


def test_gspo_gradient_is_the_gradient_of_the_sequence_objective():
    # GSPO (eq. 5, unclipped): J = (1/B) sum_i A_i s_i, s_i = exp(mean_t (logp - old)); dJ/dlogp_it = A_i s_i / |y_i|
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, OLD, ADV, ratio_level="sequence", mask=MASK)
    aggregate(loss, MASK, "seq-mean-token-mean").backward()
    close(logp.grad, [[-S0 / 2 / 2, -S0 / 2 / 2, 0.0], [S1 / 2, 0.0, 0.0]])
    # ... the same as differentiating J written directly
    direct = LOGP.clone().requires_grad_(True)
    s = torch.exp(((direct - OLD) * MASK).sum(1) / MASK.sum(1))  # (B,)
    (-(ADV[:, 0] * s).mean()).backward()
    close(logp.grad, direct.grad)


def test_gspo_clips_whole_sequences():
    logp = LOGP.clone().requires_grad_(True)
    loss, clipped = policy_loss(logp, OLD, ADV, clip_low=0.2, clip_high=0.2, ratio_level="sequence", mask=MASK)
    # row 0: s = 1.414 > 1.2 with A > 0 -> -1.2 on both tokens; row 1: s = 0.5 < 0.8 with A < 0 -> 0.8
    close(loss * MASK, [[-1.2, -1.2, 0.0], [0.8, 0.0, 0.0]])
    close(clipped * MASK, MASK)
    aggregate(loss, MASK, "seq-mean-token-mean").backward()
    close(logp.grad, torch.zeros_like(LOGP))  # every sequence clipped: no gradient
    # the token level clips only token (0, 0) (ratio 2) and token (1, 0) (ratio 0.5)
    tok, tclip = policy_loss(LOGP, OLD, ADV, clip_low=0.2, clip_high=0.2)
    close(tok * MASK, [[-1.2, -1.0, 0.0], [0.8, 0.0, 0.0]])
    close(tclip * MASK, [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


def test_sequence_ratio_needs_a_mask_and_a_known_level():
    with pytest.raises(ValueError, match="needs the completion mask"):
        log_ratio(LOGP, OLD, None, "sequence")
    with pytest.raises(ValueError, match="unknown ratio level 'word'"):
        log_ratio(LOGP, OLD, MASK, "word")


# ----------------------------------------------------------------------- dual-clip


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    # ratios 5, 2, 5 with A = -1, -1, +1; ε = 0.2, c = 3
    logp = t([[L(5.0), L(2.0), L(5.0)]]).requires_grad_(True)
    old = torch.zeros(1, 3, dtype=F)
    adv = t([[-1.0, -1.0, 1.0]])
    loss, clipped = policy_loss(logp, old, adv, 0.2, 0.2, clip_c=3.0)
    close(loss, [[3.0, 2.0, -1.2]])  # min(max(5, 1.2), 3) = 3; 2 < 3 stays; A > 0: PPO's clip
    close(clipped, [[1.0, 0.0, 1.0]])
    loss.sum().backward()
    close(logp.grad, [[0.0, 2.0, 0.0]])  # d(-A r)/dlogp = -A r = 2 for the unclipped token
    plain, _ = policy_loss(logp.detach(), old, adv, 0.2, 0.2)
    close(plain, [[5.0, 2.0, -1.2]])  # without c the first token's loss is unbounded in r


def test_clip_fractions_split_low_high_and_dual():
    ratio = t([[0.5, 0.5, 1.5, 1.5, 4.0, 1.0]])
    adv = t([[-1.0, 1.0, 1.0, -1.0, -1.0, 1.0]])
    low, high, dual = clip_fractions(ratio, adv, 0.2, 0.28, 3.0)
    close(low, [[1, 0, 0, 0, 0, 0]])  # ratio < 0.8 with A < 0
    close(high, [[0, 0, 1, 0, 0, 0]])  # ratio > 1.28 with A > 0
    close(dual, [[0, 0, 0, 0, 1, 0]])  # ratio > 3 with A < 0
    for x in clip_fractions(ratio, adv):  # no bounds: nothing clipped
        close(x, torch.zeros_like(ratio))
    # the indicator of policy_loss is exactly low | high | dual
    _, clipped = policy_loss(ratio.log(), torch.zeros_like(ratio), adv, 0.2, 0.28, clip_c=3.0)
    close(clipped, low + high + dual)


# ----------------------------------------------------------------------- REINFORCE++ (global whitening)

# 4 completions (G = 2), lengths 1, 2, 1, 2, task reward on the last token: 1, 0, 0, 0
LEN = [1, 2, 1, 2]
RMASK = t([[1, 0], [1, 1], [1, 0], [1, 1]])
REWARDS = t([[1, 0], [0, 0], [0, 0], [0, 0]])


def test_reinforce_pp_whitens_returns_over_every_token_of_the_batch():
    adv, _ = lm_advantages("reinforce", "none", REWARDS, RMASK, None, 2, 1.0, 0.95)
    w = masked_whiten(adv, RMASK)
    # token returns 1, 0, 0, 0, 0, 0: mean 1/6, unbiased variance (25/36 + 5/36) / 5 = 1/6
    sd = math.sqrt(1 / 6)
    close(w, t([[5 / 6, 0], [-1 / 6, -1 / 6], [-1 / 6, 0], [-1 / 6, -1 / 6]]) / sd, tol=1e-6)


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    adv, _ = lm_advantages("reinforce", "group_mean", REWARDS, RMASK, None, 2, 1.0, 0.95)
    close(adv, [[0.5, 0], [-0.5, -0.5], [0, 0], [0, 0]])
    # tokens .5, -.5, -.5, 0, 0, 0: mean -1/12; squared deviations (49 + 25 + 25 + 1 + 1 + 1) / 144
    mean, sd = -1 / 12, math.sqrt(102 / 144 / 5)
    want = (t([[0.5, 0], [-0.5, -0.5], [0, 0], [0, 0]]) - mean) / sd * RMASK
    close(masked_whiten(adv, RMASK), want, tol=1e-6)


def test_global_whitening_equals_whitening_the_whole_batch():
    # a reduce over two processes holding the same half: the whole batch is the half twice
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=F)
    m = (torch.arange(5)[None] < torch.tensor([[2], [5], [4]])).to(F)
    whole = masked_whiten(torch.cat([x, x]), torch.cat([m, m]))
    close(masked_whiten(x, m, reduce=lambda v, op: 2 * v if op == "sum" else v), whole[:3])
    assert not torch.allclose(masked_whiten(x, m), whole[:3])  # n - 1 differs: the global count matters


# ----------------------------------------------------------------------- DAPO's dynamic sampling


def test_zero_spread_groups():
    scores = t([1, 1, 1, 0, 0.5, 0.5, 0, 0, 0])
    assert zero_spread_groups(scores, 3).tolist() == [True, False, True]  # 1 1 1 | 0 .5 .5 | 0 0 0
    assert zero_spread_groups(scores[:6], 2).tolist() == [True, False, True]  # 1 1 | 1 0 | .5 .5


# ----------------------------------------------------------------------- sampler correction


@pytest.mark.parametrize("mode", ["none", "tis", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sampler_correction_is_the_identity_when_the_paths_agree(mode, level):
    w, capped = sampler_is_weights(LOGP, LOGP.clone(), MASK, mode, 1.0, level)
    assert torch.equal(w, MASK) and torch.equal(capped, torch.zeros_like(MASK))


def test_sampler_weights_hand_values():
    # learner/sampler: row 0: ρ = 2, 1/2; row 1: ρ = 4
    logp = t([[L(0.5), L(0.25), -1.0], [L(0.8), -1.0, -1.0]])
    samp = t([[L(0.25), L(0.5), -7.0], [L(0.2), -7.0, -7.0]])
    close(sampler_log_ratio(logp, samp, MASK), [[L(2), -L(2), 0], [L(4), 0, 0]])
    close(sampler_log_ratio(logp, samp, MASK, "sequence"), [[0, 0, 0], [L(4), 0, 0]])
    w, capped = sampler_is_weights(logp, samp, MASK, "tis", 1.5)
    close(w, [[1.5, 0.5, 0], [1.5, 0, 0]])
    close(capped, [[1, 0, 0], [1, 0, 0]])
    w, _ = sampler_is_weights(logp, samp, MASK, "mask", 1.5)
    close(w, [[0, 0.5, 0], [0, 0, 0]])
    w, capped = sampler_is_weights(logp, samp, MASK, "tis", 3.0, "sequence")
    close(w, [[1, 1, 0], [3, 0, 0]])  # row 0: ρ = 2 * 1/2 = 1; row 1: min(4, 3)
    close(capped, [[0, 0, 0], [1, 0, 0]])
    w, _ = sampler_is_weights(logp, samp, MASK, "mask", 3.0, "sequence")
    close(w, [[1, 1, 0], [0, 0, 0]])
    w, _ = sampler_is_weights(logp, samp, MASK, "none", 3.0)
    assert torch.equal(w, MASK)


def test_sampler_weights_carry_no_gradient_and_check_the_cap():
    logp = LOGP.clone().requires_grad_(True)
    w, _ = sampler_is_weights(logp, OLD, MASK, "tis", 2.0)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap must be >= 1"):
        sampler_is_weights(LOGP, OLD, MASK, "tis", 0.5)
    with pytest.raises(ValueError, match="unknown sampler correction 'clip'"):
        sampler_is_weights(LOGP, OLD, MASK, "clip", 2.0)
