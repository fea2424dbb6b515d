"""pg_lm/core/losses.py against numbers computed by hand for small cases."""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.core import aggregate, approx_kl, entropy_from_logits, kl_estimate, policy_loss, value_loss

F = torch.float64
LN2 = math.log(2.0)


def t(rows, dtype=F):
    return torch.tensor(rows, dtype=dtype)


def close(got, want, tol=1e-12):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


# ----------------------------------------------------------------------- kl_estimate

# Row 0: pi = .5, pi_ref = .25 -> log r = log(pi_ref / pi) = -ln 2
# Row 1: pi = .25, pi_ref = .5 -> log r = +ln 2
LOGP = t([[math.log(0.5)], [math.log(0.25)]])
REF = t([[math.log(0.25)], [math.log(0.5)]])


def test_kl_k1():
    close(kl_estimate(LOGP, REF, "k1"), [[LN2], [-LN2]])


def test_kl_k2():
    close(kl_estimate(LOGP, REF, "k2"), [[0.5 * LN2**2], [0.5 * LN2**2]])  # 0.2402265...


def test_kl_k3():
    # r - 1 - log r: (.5 - 1 + ln 2) = .1931472, (2 - 1 - ln 2) = .3068528
    close(kl_estimate(LOGP, REF, "k3"), [[0.5 - 1 + LN2], [2 - 1 - LN2]])
    close(kl_estimate(LOGP, REF), kl_estimate(LOGP, REF, "k3"))  # k3 is the default


def test_kl_k3_gradient():
    # d/dlogp [r - 1 - log r] with log r = ref - logp is 1 - r: 1 - .5 and 1 - 2
    logp = LOGP.clone().requires_grad_(True)
    kl_estimate(logp, REF, "k3").sum().backward()
    close(logp.grad, [[0.5], [-1.0]])


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_all_zero_when_equal(kind):
    logp = t([[-0.1, -2.0, -7.5], [-30.0, 0.0, -1e-3]])
    assert torch.equal(kl_estimate(logp, logp.clone(), kind), torch.zeros_like(logp))


def test_kl_k3_nonnegative_and_finite_float64():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(64, 64, generator=g, dtype=F) * 5
    ref = torch.randn(64, 64, generator=g, dtype=F) * 5
    k3 = kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all()
    # extreme gaps are clamped (|log r| <= 20) instead of overflowing
    huge = kl_estimate(t([[0.0, -500.0]], torch.float32), t([[-500.0, 0.0]], torch.float32), "k3")
    assert torch.isfinite(huge).all() and (huge >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kl_k3_nonnegative_for_small_gaps(dtype):
    tiny = torch.tensor([1e-20, 1e-12, 1e-9], dtype=F)
    ref = torch.cat([torch.linspace(-1e-2, 1e-2, 4001, dtype=F), tiny]).to(dtype)[None]  # (1, T)
    k3 = kl_estimate(torch.zeros_like(ref), ref, "k3")
    assert (k3 >= 0).all(), f"min k3 = {k3.min().item()}"


# ----------------------------------------------------------------------- approx_kl


def test_approx_kl_hand_values():
    """k3 of KL(π_old || π_θ) per token, r = π_θ / π_old: r - 1 - log r."""
    new = t([[math.log(0.5), math.log(0.25), math.log(0.3)]])
    old = t([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    # r = 2: 2 - 1 - ln 2 = .3068528; r = 1/2: .5 - 1 + ln 2 = .1931472; r = 1: 0
    close(approx_kl(new, old), [[1 - LN2, LN2 - 0.5, 0.0]])


def test_approx_kl_estimates_kl_from_old_to_new_under_old_samples():
    """Averaged over the old policy's actions it is exactly KL(π_old || π_θ) (sum_a π_old r = 1),
    which differs from the reverse KL(π_θ || π_old) for these two distributions."""
    p_old, p_new = t([0.98, 0.01, 0.01]), t([0.5, 0.25, 0.25])  # KL .595, reverse KL 1.273
    expected = (p_old * (p_old / p_new).log()).sum()
    reverse = (p_new * (p_new / p_old).log()).sum()
    got = (p_old * approx_kl(p_new.log()[None], p_old.log()[None])[0]).sum()
    close(got, expected)
    assert abs(float(got - reverse)) > 0.1
    close(approx_kl(p_new.log()[None], p_old.log()[None]), kl_estimate(p_old.log()[None], p_new.log()[None], "k3"))


# ----------------------------------------------------------------------- policy_loss


def test_policy_loss_unclipped_value():
    # ratio = (2, .5); loss = -A * ratio
    logp = t([[math.log(0.5), math.log(0.2)]])
    old = t([[math.log(0.25), math.log(0.4)]])
    adv = t([[1.5, -2.0]])
    loss, clipped = policy_loss(logp, old, adv)
    close(loss, [[-3.0, 1.0]])
    close(clipped, [[0.0, 0.0]])


def test_policy_loss_unclipped_gradient_is_reinforce():
    # At old_logp = logp.detach(), d loss / d logp = -A (REINFORCE's -A grad log pi).
    logp = t([[-0.3, -1.2, -4.0]]).requires_grad_(True)
    adv = t([[2.0, -0.5, 0.0]])
    loss, _ = policy_loss(logp, logp.detach(), adv)
    close(loss.detach(), [[-2.0, 0.5, 0.0]])
    loss.sum().backward()
    close(logp.grad, [[-2.0, 0.5, 0.0]])


# (ratio, A) -> (loss, clip indicator, d loss / d log ratio) for clip_low=.2, clip_high=.28
CLIP_CASES = [
    (1.5, 1.0, -1.28, 1.0, 0.0),  # A > 0, above 1 + clip_high: clipped, no gradient
    (0.5, 1.0, -0.5, 0.0, -0.5),  # A > 0, below 1 - clip_low: NOT clipped (pessimistic min)
    (0.5, -1.0, 0.8, 1.0, 0.0),  # A < 0, below 1 - clip_low: clipped, no gradient
    (1.5, -1.0, 1.5, 0.0, 1.5),  # A < 0, above 1 + clip_high: NOT clipped
    (1.1, 1.0, -1.1, 0.0, -1.1),  # inside the trust region
    (1.25, 2.0, -2.5, 0.0, -2.5),  # inside only because clip_high (.28) != clip_low (.2)
    (0.79, -2.0, 1.6, 1.0, 0.0),  # just below 1 - clip_low with A < 0
]


def test_policy_loss_clipped_cases():
    ratio = t([[c[0] for c in CLIP_CASES]])
    adv = t([[c[1] for c in CLIP_CASES]])
    logp = torch.log(ratio).requires_grad_(True)
    loss, ind = policy_loss(logp, torch.zeros_like(ratio), adv, clip_low=0.2, clip_high=0.28)
    close(loss.detach(), [[c[2] for c in CLIP_CASES]], tol=1e-12)
    close(ind, [[c[3] for c in CLIP_CASES]])
    loss.sum().backward()
    close(logp.grad, [[c[4] for c in CLIP_CASES]], tol=1e-12)


def test_policy_loss_one_sided_clipping():
    ratio = t([[0.1, 2.0, 5.0, 0.5]])
    adv = t([[-1.0, 1.0, 1.0, -1.0]])
    old = torch.zeros_like(ratio)
    # clip_high only: no lower bound, so A<0 at ratio .1 stays .1; ratio 2 with A>0 -> 1.28
    loss, ind = policy_loss(torch.log(ratio), old, adv, clip_high=0.28)
    close(loss, [[0.1, -1.28, -1.28, 0.5]])
    close(ind, [[0.0, 1.0, 1.0, 0.0]])
    # clip_low only: no upper bound, so A>0 at ratio 5 stays -5; A<0 at .5 -> .8
    loss, ind = policy_loss(torch.log(ratio), old, adv, clip_low=0.2)
    close(loss, [[0.8, -2.0, -5.0, 0.8]])
    close(ind, [[1.0, 0.0, 0.0, 1.0]])


def test_policy_loss_on_policy_clipping_is_inactive():
    # First PPO epoch: ratio == 1 everywhere, so clipping changes neither loss nor gradient.
    logp = t([[-0.5, -2.0], [-1.0, -3.0]]).requires_grad_(True)
    adv = t([[1.0, -3.0], [0.5, 2.0]])
    loss, ind = policy_loss(logp, logp.detach(), adv, clip_low=0.2, clip_high=0.2)
    close(loss.detach(), -adv)
    close(ind, torch.zeros_like(adv))
    loss.sum().backward()
    close(logp.grad, -adv)


# ------------------------------------------------------------------------ value_loss


def test_value_loss_plain():
    close(value_loss(t([[1.0, 2.0]]), t([[7.0, 7.0]]), t([[0.0, 4.0]])), [[0.5, 2.0]])


def test_value_loss_clipped():
    v = t([[2.0, 0.0, 3.0, 1.2]])
    old = t([[1.0, 1.0, 1.0, 1.0]])
    ret = t([[0.0, 2.0, 3.0, 5.0]])
    # col 0: (2-0)^2 = 4 vs (1.5-0)^2 = 2.25 -> 2; col 1: 4 vs (.5-2)^2 = 2.25 -> 2
    # col 2: 0 vs (1.5-3)^2 = 2.25 -> 1.125 (the clipped term wins)
    # col 3: |V - old| = .2 < .5, not clipped: (1.2-5)^2 / 2 = 7.22
    close(value_loss(v, old, ret, clip=0.5), [[2.0, 2.0, 1.125, 7.22]])


def test_value_loss_clipped_gradient():
    v = t([[3.0, 1.2]]).requires_grad_(True)
    value_loss(v, t([[1.0, 1.0]]), t([[3.0, 5.0]]), clip=0.5).sum().backward()
    # col 0: the clipped term is constant in V -> 0; col 1: V - R = -3.8
    close(v.grad, [[0.0, -3.8]])


# ---------------------------------------------------------------- entropy_from_logits


@pytest.mark.parametrize("V", [2, 7, 50])
def test_entropy_uniform_is_log_v(V):
    logits = torch.full((2, 3, V), 3.7)
    out = entropy_from_logits(logits)
    assert out.shape == (2, 3)
    close(out, torch.full((2, 3), math.log(V)), tol=1e-6)


def test_entropy_hand_number_and_dtype():
    # p = (1/4, 3/4): H = -(.25 ln .25 + .75 ln .75) = 0.5623351446
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.bfloat16)
    out = entropy_from_logits(logits)
    assert out.dtype == torch.float32  # computed in fp32 whatever the logits' dtype
    close(out, [0.5623351446], tol=1e-2)  # bf16 rounds ln 3
    close(entropy_from_logits(torch.tensor([[0.0, math.log(3.0)]], dtype=F)), [0.5623351446], tol=1e-9)
    close(entropy_from_logits(torch.tensor([[0.0, -1e4]])), [0.0], tol=1e-6)  # one-hot: 0


def test_entropy_with_minus_inf_logits():
    out = entropy_from_logits(torch.tensor([[0.0, 0.0, float("-inf")]]))
    close(out, [LN2], tol=1e-6)


# ------------------------------------------------------------------------- aggregate

LOSS = t([[1, 2, 3, 4], [10, 20, 30, 40]])
MASK = t([[1, 1, 1, 1], [1, 1, 0, 0]])  # 6 tokens; masked sum = 1+2+3+4+10+20 = 40


def test_aggregate_token_mean():
    close(aggregate(LOSS, MASK, "token-mean"), 40 / 6)
    close(aggregate(LOSS, MASK), 40 / 6)  # the default mode
    close(aggregate(LOSS, MASK.bool(), "token-mean"), 40 / 6)
    close(aggregate(LOSS, MASK, "token-mean", num_tokens=10), 4.0)  # global token count


def test_aggregate_seq_mean_token_mean():
    # row means 2.5 and 15; mean over 2 sequences
    close(aggregate(LOSS, MASK, "seq-mean-token-mean"), (2.5 + 15) / 2)
    close(aggregate(LOSS, MASK, "seq-mean-token-mean", num_seqs=4), (2.5 + 15) / 4)


def test_aggregate_seq_mean_token_sum_norm():
    close(aggregate(LOSS, MASK, "seq-mean-token-sum-norm", norm_len=8), 40 / (2 * 8))
    close(aggregate(LOSS, MASK, "seq-mean-token-sum-norm", num_seqs=4, norm_len=8), 40 / (4 * 8))
    # the constant does not depend on lengths: shortening row 1 changes only the numerator
    short = MASK.clone()
    short[1, 1] = 0
    close(aggregate(LOSS, short, "seq-mean-token-sum-norm", norm_len=8), 20 / (2 * 8))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_all_masked_is_zero_not_nan(mode):
    out = aggregate(LOSS, torch.zeros_like(MASK), mode, norm_len=4)
    assert out.item() == 0.0


def test_aggregate_gradients_token_vs_sequence_weighting():
    # token-mean: every real token gets 1/6; seq-mean-token-mean: row 0 tokens 1/(2*4),
    # row 1 tokens 1/(2*2); masked tokens get 0 in both.
    x = LOSS.clone().requires_grad_(True)
    aggregate(x, MASK, "token-mean").backward()
    close(x.grad, MASK / 6)
    x.grad = None
    aggregate(x, MASK, "seq-mean-token-mean").backward()
    close(x.grad, [[1 / 8] * 4, [1 / 4, 1 / 4, 0, 0]])
