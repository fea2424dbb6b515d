"""Property tests: every pg_lm/core function on the inputs that break estimators.

Generated inputs include rows that are entirely masked, T = 1, B = 1, G = 1 where it
is allowed, rewards of 1e6 with small differences, magnitudes up to 1e30, groups whose
scores are all equal, junk (NaN, ±inf, 1e30) at masked positions and logits that are
-inf outside the sampled token. Each test asserts that the output is finite and equals
the documented value: exactly where the documentation says so (an all-equal group has
advantage 0, a masked position is 0, whitening a constant gives 0), otherwise within a
floating-point bound, against a reference computed exactly with Python fractions.

The bounds scale with the *spread* of the inputs (max - min), not their magnitude: a
group of rewards 1e6 + {0, 1} must give advantages ±0.5, not rounding noise of 1e6.
Runs are derandomised (the same examples on every run) and the file stays small.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_lm.core import (
    AGG_MODES,
    KL_ESTIMATORS,
    aggregate,
    batch_mean_baseline,
    discounted_returns,
    entropy_from_logits,
    gae,
    group_mean_baseline,
    group_std,
    kl_estimate,
    last_step_mask,
    leave_one_out_baseline,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from pg_lm.lm.estimate import advantages as lm_advantages

PROP = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
DTYPES = st.sampled_from([torch.float32, torch.float64])
UNIT = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)
JUNK = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30])
SCALES = (1.0, 1e6, 1e30)  # ordinary, "rewards of 1e6", extreme


def eps_of(dtype) -> float:
    return torch.finfo(dtype).eps


def F(x) -> Fraction:
    return Fraction(float(x))


def near(got, want, tol, what=""):
    """Elementwise |got - want| <= tol, compared in float64; got must be finite.

    A nonzero tol also allows underflow in got's dtype (products of subnormal inputs)."""
    got = torch.as_tensor(got)
    floor = 4 * torch.finfo(got.dtype).tiny
    got = got.double()
    want = torch.as_tensor(want, dtype=torch.float64).expand_as(got)
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(got)
    tol = torch.where(tol > 0, tol + floor, tol)
    assert torch.isfinite(got).all(), f"{what}: non-finite output {got}"
    bad = (got - want).abs() > tol
    assert not bad.any(), f"{what}: got {got[bad].tolist()}, want {want[bad].tolist()} (tol {tol[bad].tolist()})"


@st.composite
def spread_values(draw, n, scales=SCALES):
    """n floats ``base + spread * u``: all equal (spread 0), huge with small differences, or huge spread."""
    scale = draw(st.sampled_from(scales))
    base = draw(UNIT) * scale  # 0, ±1 and awkward values such as 0.1 whose sums round
    spread = draw(st.sampled_from([0.0, 1.0, scale]))
    return [base + spread * u for u in draw(st.lists(UNIT, min_size=n, max_size=n))]


def tensor(vals, dtype, *shape):
    return torch.tensor(vals, dtype=torch.float64).to(dtype).view(*shape)


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) bool


# ----------------------------------------------------------------------------- masked.py


@st.composite
def masked_batch(draw, scales=SCALES):
    """x (B, T) with junk at masked positions, its mask (bool or float), and the unmasked values."""
    dtype = draw(DTYPES)
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    x = tensor(draw(spread_values(B * T, scales)), dtype, B, T)
    m = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    x = torch.where(m, x, torch.tensor(draw(JUNK), dtype=dtype))
    mask = m.to(dtype) if draw(st.booleans()) else m
    return x, mask, m


def exact_stats(vals, unbiased=True):
    """(mean, var) of a list of floats, exactly; (0, 0) for an empty list."""
    if not vals:
        return Fraction(0), Fraction(0)
    fr = [F(v) for v in vals]
    mean = sum(fr, Fraction(0)) / len(fr)
    n = len(fr)
    denom = n - 1 if unbiased and n > 1 else n
    return mean, sum(((v - mean) ** 2 for v in fr), Fraction(0)) / denom


@PROP
@given(masked_batch(), st.sampled_from([None, 0, 1]))
def test_masked_sum_and_mean_ignore_masked_junk(xm, dim):
    x, mask, m = xm
    e = eps_of(x.dtype)
    if dim is None:
        groups = [x[m].tolist()]
    else:
        xs = x if dim == 1 else x.T
        ms = m if dim == 1 else m.T
        groups = [row[mr].tolist() for row, mr in zip(xs, ms)]
    s, mu = masked_sum(x, mask, dim), masked_mean(x, mask, dim)
    for i, vals in enumerate(groups):
        mag = max([abs(v) for v in vals], default=0.0)
        tol = 2 * len(vals) * e * mag
        want_sum = sum((F(v) for v in vals), Fraction(0))
        near(s.reshape(-1)[i], float(want_sum), tol, "masked_sum")
        near(mu.reshape(-1)[i], float(want_sum / max(len(vals), 1)), tol, "masked_mean")
        if not vals:  # nothing unmasked: 0 exactly, not NaN
            assert s.reshape(-1)[i] == 0 and mu.reshape(-1)[i] == 0


@PROP
@given(masked_batch(scales=(1.0, 1e6, 1e19)), st.booleans())
def test_masked_var_is_finite_and_exact_for_constants(xm, unbiased):
    x, mask, m = xm
    vals = x[m].tolist()
    v = masked_var(x, mask, unbiased=unbiased)
    _, want = exact_stats(vals, unbiased)
    if len(set(vals)) <= 1:  # a constant, a single value or nothing: 0 exactly
        assert v == 0, f"masked_var of a constant {vals} is {v}"
        return
    spread = max(vals) - min(vals)
    near(v, float(want), 8 * len(vals) * eps_of(x.dtype) * spread**2, "masked_var")


@PROP
@given(masked_batch(), st.booleans(), st.sampled_from([1e-8, 0.0]))
def test_masked_whiten_is_finite_and_zero_for_constants(xm, shift_mean, eps):
    x, mask, m = xm
    w = masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    vals = x[m].tolist()
    assert torch.isfinite(w).all(), f"masked_whiten gave {w} for {x}"
    assert (w[~m] == 0).all(), "masked positions must be 0"
    mean, var = exact_stats(vals)
    if len(set(vals)) <= 1:  # constant or single value: (x - mean) = 0 exactly, and so is the output
        want = float(mean) if not shift_mean else 0.0
        near(w[m], want, 0.0, "masked_whiten of a constant")
        return
    # exact reference in units of the spread S (no underflow of var for tiny spreads):
    # (x - mean) / sqrt(var + eps) = ((x - mean) / S) / hypot(std / S, sqrt(eps) / S)
    e, spread = eps_of(x.dtype), max(vals) - min(vals)
    S = F(spread)
    std_s = math.hypot(math.sqrt(float(var / S**2)), math.sqrt(eps) / spread)
    want = [float((F(v) - mean) / S) / std_s + (float(mean) if not shift_mean else 0.0) for v in vals]
    tol = [16 * len(vals) * e * (1 / std_s + abs(t)) for t in want]
    if not shift_mean:  # the mean added back rounds like any mean: relative to the largest |x|
        tol = [t + 4 * len(vals) * e * max(abs(v) for v in vals) for t in tol]
    near(w[m], want, tol, "masked_whiten")


# ------------------------------------------------------------------------- advantages.py


@st.composite
def episode_batch(draw):
    """rewards, values (B, T) with junk at masked positions, prefix lengths, γ, λ."""
    dtype = draw(DTYPES)
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    m = prefix_mask(lengths, T)
    junk = torch.tensor(draw(JUNK), dtype=dtype)
    r = torch.where(m, tensor(draw(spread_values(B * T)), dtype, B, T), junk)
    v = torch.where(m, tensor(draw(spread_values(B * T)), dtype, B, T), junk)
    gamma = draw(st.sampled_from([0.0, 0.5, 0.99, 1.0]))
    lam = draw(st.sampled_from([0.0, 0.95, 1.0]))
    mask = m.to(dtype) if draw(st.booleans()) else m
    return r, v, mask, lengths, gamma, lam


@PROP
@given(episode_batch())
def test_last_step_mask_marks_the_last_real_step(ep):
    _, _, mask, lengths, _, _ = ep
    last = last_step_mask(mask)
    for row, L in zip(last, lengths):
        want = [t == L - 1 for t in range(len(row))]  # a fully masked row has no last step
        assert row.tolist() == want


@PROP
@given(episode_batch())
def test_discounted_returns_finite_exact_and_zero_where_masked(ep):
    r, _, mask, lengths, gamma, _ = ep
    out = discounted_returns(r, mask, gamma)
    e, g = eps_of(r.dtype), F(gamma)
    for b, L in enumerate(lengths):
        for t in range(r.shape[1]):
            if t >= L:  # masked (a fully masked row is all here): 0 exactly, whatever the reward holds
                assert out[b, t] == 0, f"masked return {out[b, t]}"
                continue
            terms = [g ** (k - t) * F(r[b, k]) for k in range(t, L)]
            mag = float(sum((abs(x) for x in terms), Fraction(0)))
            near(out[b, t], float(sum(terms, Fraction(0))), 4 * (L - t + 1) * e * mag, "discounted_returns")


@PROP
@given(episode_batch())
def test_gae_finite_exact_and_zero_where_masked(ep):
    r, v, mask, lengths, gamma, lam = ep
    adv, ret = gae(r, v, mask, gamma, lam)
    e, g, gl = eps_of(r.dtype), F(gamma), F(gamma) * F(lam)
    for b, L in enumerate(lengths):
        # default flags: the episode terminates at its last real step (no bootstrap there)
        delta = [F(r[b, k]) + (g * F(v[b, k + 1]) if k + 1 < L else 0) - F(v[b, k]) for k in range(L)]
        for t in range(r.shape[1]):
            if t >= L:
                assert adv[b, t] == 0 and ret[b, t] == 0, "masked GAE output must be 0"
                continue
            terms = [gl ** (k - t) * delta[k] for k in range(t, L)]
            mag = float(sum((abs(F(r[b, k])) + 2 * abs(F(v[b, k])) for k in range(t, L)), Fraction(0)))
            tol = 8 * (L - t + 1) * e * mag
            want = sum(terms, Fraction(0))
            near(adv[b, t], float(want), tol, "gae advantage")
            near(ret[b, t], float(want + F(v[b, t])), tol + 2 * e * abs(float(v[b, t])), "gae return")
        if r.shape[1] == 1 and L == 1:  # T = 1: A = r - V, R = r
            near(adv[b, 0], float(F(r[b, 0]) - F(v[b, 0])), 2 * e * (abs(float(r[b, 0])) + abs(float(v[b, 0]))))


@st.composite
def grouped_scores(draw, min_group=1):
    """scores (n * G,) where each group is all equal, near-equal around 1e6 or 1e30, or spread."""
    dtype = draw(DTYPES)
    G, n = draw(st.integers(min_group, 5)), draw(st.integers(1, 3))
    vals = []
    for _ in range(n):
        vals += draw(spread_values(G))
    return tensor(vals, dtype, n * G), G


def group_tol(grp, dtype, n):
    """Rounding bound for a statistic of a group: proportional to its spread, plus its own rounding."""
    e, spread = eps_of(dtype), max(grp) - min(grp)
    return 4 * n * e * spread + 2 * e * max(abs(x) for x in grp)


@PROP
@given(grouped_scores())
def test_group_mean_and_batch_mean_baselines(sg):
    s, G = sg
    groups = s.view(-1, G).tolist()
    b = group_mean_baseline(s, G).view(-1, G)
    for row, grp in zip(b, groups):
        mean, _ = exact_stats(grp)
        near(row, float(mean), group_tol(grp, s.dtype, G), "group_mean_baseline")
        if len(set(grp)) == 1:  # all equal (and every G = 1 group): the baseline is the score, advantage 0
            assert (torch.tensor(grp, dtype=s.dtype) - row == 0).all(), f"nonzero advantage for equal group {grp}"
    bb = batch_mean_baseline(s)
    flat = s.tolist()
    near(bb, float(exact_stats(flat)[0]), group_tol(flat, s.dtype, len(flat)), "batch_mean_baseline")
    if len(set(flat)) == 1:
        assert (s - bb == 0).all(), "an all-equal batch must have advantage 0"


@PROP
@given(grouped_scores())
def test_leave_one_out_baseline(sg):
    s, G = sg
    if G == 1:  # documented: needs another sample of the same prompt
        with pytest.raises(ValueError, match="group_size >= 2"):
            leave_one_out_baseline(s, G)
        return
    b = leave_one_out_baseline(s, G).view(-1, G)
    for row, grp in zip(b, s.view(-1, G).tolist()):
        fr = [F(x) for x in grp]
        want = [float((sum(fr, Fraction(0)) - x) / (G - 1)) for x in fr]
        near(row, want, group_tol(grp, s.dtype, G), "leave_one_out_baseline")
        if len(set(grp)) == 1:
            assert (torch.tensor(grp, dtype=s.dtype) - row == 0).all(), f"nonzero RLOO advantage for {grp}"


@PROP
@given(grouped_scores())
def test_group_std(sg):
    s, G = sg
    if G == 1:
        with pytest.raises(ValueError, match="group_size >= 2"):
            group_std(s, G)
        return
    sd = group_std(s, G).view(-1, G)
    for row, grp in zip(sd, s.view(-1, G).tolist()):
        if len(set(grp)) == 1:
            assert (row == 0).all(), f"std of an all-equal group {grp} is {row}"
            continue
        want = math.sqrt(float(exact_stats(grp)[1]))  # unbiased, as documented
        near(row, want, 8 * G * eps_of(s.dtype) * (max(grp) - min(grp)), "group_std")


@PROP
@given(grouped_scores(), st.sampled_from(["group_mean", "loo", "batch_mean"]), st.booleans(), st.data())
def test_lm_advantages_equal_group_is_zero_and_masked_row_is_zero(sg, baseline, scale, data):
    """The LM estimator end to end: scalar rewards on the last token, scaled by the group std."""
    s, G = sg
    if G == 1 and (baseline == "loo" or scale):
        return  # refused with a ValueError (tested above)
    B, T = s.numel(), data.draw(st.integers(1, 4))
    lengths = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    m = prefix_mask(lengths, T)
    rewards = torch.where(last_step_mask(m), s[:, None], torch.zeros((), dtype=s.dtype))  # (B, T)
    adv, _ = lm_advantages("reinforce", baseline, rewards, m.to(s.dtype), None, G, 1.0, 1.0, scale_rewards=scale)
    assert torch.isfinite(adv).all(), f"non-finite advantages {adv}"
    assert (adv[~m] == 0).all(), "a masked token (and every token of a fully masked row) has advantage 0"
    g0 = torch.where(torch.tensor(lengths) > 0, s, torch.zeros((), dtype=s.dtype)).view(-1, G)
    for i, grp in enumerate(g0.tolist()):
        if len(set(grp)) == 1 and baseline != "batch_mean":
            assert (adv[i * G : (i + 1) * G] == 0).all(), f"equal group {grp} has advantages {adv}"


# ----------------------------------------------------------------------------- losses.py


@st.composite
def sampled_logprobs(draw):
    """(logp, ref_logp) (B, T) of sampled tokens; some rows come from logits that are -inf
    outside the sampled token (log-prob exactly 0), logits up to 1e30."""
    dtype = draw(DTYPES)
    B, T, V = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    out = []
    for _ in range(2):
        logits = tensor(draw(spread_values(B * T * V, (1.0, 1e6, 1e30))), dtype, B, T, V)
        tok = torch.tensor(draw(st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T))).view(B, T, 1)
        peaked = torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B)))[:, None, None]
        hole = torch.ones(B, T, V, dtype=torch.bool).scatter(-1, tok, False)
        logits = torch.where(peaked & hole, torch.tensor(-math.inf, dtype=dtype), logits)
        out.append(torch.log_softmax(logits, -1).gather(-1, tok).squeeze(-1))  # (B, T)
    return out


@PROP
@given(sampled_logprobs(), st.sampled_from(KL_ESTIMATORS))
def test_kl_estimators(lps, kind):
    logp, ref = lps
    k = kl_estimate(logp, ref, kind)
    log_r = ref.double() - logp.double()
    e = eps_of(logp.dtype)
    mag = logp.double().abs() + ref.double().abs()
    if kind == "k1":
        near(k, -log_r, 2 * e * mag, "k1")
    elif kind == "k2":
        fits = log_r.abs() < 1e18  # (log r)^2 / 2 is representable
        near(k[fits], 0.5 * log_r[fits] ** 2, 8 * e * mag[fits] * log_r[fits].abs(), "k2")
    else:  # clamped to |log r| <= 20: finite always, and >= 0
        lr = log_r.clamp(-20, 20)
        near(k, torch.expm1(lr) - lr, 64 * e * (torch.exp(lr) + 1) * (1 + mag.clamp(max=20)), "k3")
    assert (k[logp == ref] == 0).all(), "KL of identical log-probs must be 0"
    if kind != "k1":
        assert (k >= 0).all()


@st.composite
def ppo_inputs(draw):
    dtype = draw(DTYPES)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    logp = tensor([-abs(x) for x in draw(spread_values(B * T, (1.0, 10.0)))], dtype, B, T)
    old = logp + tensor(draw(st.lists(st.floats(-10, 10), min_size=B * T, max_size=B * T)), dtype, B, T)
    adv = tensor(draw(spread_values(B * T)), dtype, B, T)  # includes all-zero and 1e6 / 1e30
    clip = draw(st.sampled_from([(None, None), (0.2, 0.2), (0.2, 0.28), (None, 0.2), (0.2, None)]))
    return logp, old, adv, clip


@PROP
@given(ppo_inputs())
def test_policy_loss(inp):
    logp, old, adv, (lo, hi) = inp
    loss, clipped = policy_loss(logp, old, adv, lo, hi)
    ratio = torch.exp(logp.double() - old.double())
    want = -adv.double() * ratio
    if lo is not None or hi is not None:
        c = ratio.clamp(1 - (lo if lo is not None else math.inf), 1 + (hi if hi is not None else math.inf))
        want = torch.maximum(want, -adv.double() * c)
    e = eps_of(logp.dtype)
    # exp(log ratio) rounds relative to |log ratio|; the clip bounds 1 ± c round in the dtype
    tol = 64 * e * adv.double().abs() * (ratio * (1 + (logp.double() - old.double()).abs()) + 2)
    near(loss, want, tol, "policy_loss")
    assert torch.isfinite(clipped).all() and ((clipped == 0) | (clipped == 1)).all()
    zero = adv == 0
    assert (loss[zero] == 0).all() and (clipped[zero] == 0).all(), "zero advantage must give zero loss"
    if lo is None and hi is None:
        assert (clipped == 0).all()


@PROP
@given(ppo_inputs(), st.sampled_from([100.0, 1e4]))
def test_policy_loss_zero_advantage_is_zero_even_when_the_ratio_overflows(inp, drift):
    """An all-equal group's tokens (A = 0) give loss 0 and gradient 0, not 0 * inf = NaN."""
    logp, old, adv, (lo, hi) = inp
    adv = torch.where(torch.arange(adv.numel()).view_as(adv) % 2 == 0, torch.zeros_like(adv), adv)
    logp = (logp + drift).requires_grad_(True)  # log ratio up to +1e4: exp overflows
    loss, clipped = policy_loss(logp, old, adv, lo, hi)
    zero = adv == 0
    assert (loss[zero] == 0).all() and (clipped[zero] == 0).all()
    loss[zero].sum().backward()
    assert (logp.grad[zero] == 0).all()


@PROP
@given(st.data(), DTYPES, st.sampled_from([None, 0.2, 10.0]))
def test_value_loss(data, dtype, clip):
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    scales = (1.0, 1e6, 1e18)  # 0.5 (V - R)^2 must be representable
    v, ov, r = (tensor(data.draw(spread_values(B * T, scales)), dtype, B, T) for _ in range(3))
    loss = value_loss(v, ov, r, clip)
    V, OV, R = v.double(), ov.double(), r.double()
    want = (V - R) ** 2
    if clip is not None:
        want = torch.maximum(want, (OV + (V - OV).clamp(-clip, clip) - R) ** 2)
    mag = (V.abs() + OV.abs() + R.abs() + (clip or 0)) ** 2
    near(loss, 0.5 * want, 8 * eps_of(dtype) * mag, "value_loss")
    assert (loss[(v == r) & (ov == r)] == 0).all()


@PROP
@given(st.data(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_entropy_from_logits(data, dtype):
    B, V = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    logits = tensor(data.draw(spread_values(B * V, (1.0, 1e6, 1e30))), dtype, B, V)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * V, max_size=B * V))).view(B, V)
    keep[:, 0] = True  # at least one token can be sampled
    logits = torch.where(keep, logits, torch.tensor(-math.inf, dtype=dtype))
    h = entropy_from_logits(logits)
    assert h.dtype == torch.promote_types(dtype, torch.float32)
    x = logits.double()
    p = torch.softmax(x, -1)
    want = -(p * torch.log_softmax(x, -1).masked_fill(p == 0, 0)).sum(-1)
    near(h, want, 64 * eps_of(h.dtype) * (1 + math.log(V)), "entropy")
    assert (h >= 0).all() and (h <= math.log(V) + 1e-5).all()
    one = keep.sum(-1) == 1  # -inf outside the sampled token: a point mass, entropy exactly 0
    assert (h[one] == 0).all()


@st.composite
def loss_batch(draw):
    """A per-token loss (B, T) with junk at masked positions and some fully masked rows."""
    dtype = draw(DTYPES)
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    m = prefix_mask(lengths, T)
    loss = torch.where(m, tensor(draw(spread_values(B * T)), dtype, B, T), torch.tensor(draw(JUNK), dtype=dtype))
    return loss, m, lengths


@PROP
@given(loss_batch(), st.sampled_from(AGG_MODES), st.booleans())
def test_aggregate_ignores_masked_junk_and_empty_rows(lb, mode, global_counts):
    loss, m, lengths = lb
    mask = m.to(loss.dtype)
    B = loss.shape[0]
    kw = {"norm_len": float(loss.shape[1])} if mode == "seq-mean-token-sum-norm" else {}
    if global_counts:  # counts of a larger global batch, as the trainer passes them
        kw.update(num_tokens=sum(lengths) + 3, num_seqs=B + 2)
    got = aggregate(loss, mask, mode, **kw)
    rows = [[F(x) for x in loss[b, :L].tolist()] for b, L in enumerate(lengths)]
    n_tok = kw.get("num_tokens", sum(lengths))
    n_seq = kw.get("num_seqs", B)
    if mode == "token-mean":
        want = sum((sum(r, Fraction(0)) for r in rows), Fraction(0)) / max(n_tok, 1)
    elif mode == "seq-mean-token-mean":  # a fully masked row adds 0 (and counts as a sequence)
        want = sum((sum(r, Fraction(0)) / len(r) for r in rows if r), Fraction(0)) / max(n_seq, 1)
    else:
        want = sum((sum(r, Fraction(0)) for r in rows), Fraction(0)) / (max(n_seq, 1) * kw["norm_len"])
    mag = max([abs(float(x)) for r in rows for x in r], default=0.0)
    near(got, float(want), 4 * (loss.numel() + 1) * eps_of(loss.dtype) * mag, f"aggregate {mode}")
    if not any(lengths):
        assert got == 0, "a fully masked batch has loss 0"


def test_aggregate_refuses_a_non_positive_norm_len():
    with pytest.raises(ValueError, match="norm_len must be > 0"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm", norm_len=0)


def test_aggregate_of_policy_loss_with_minus_inf_logprobs_on_padding():
    """Padding often holds log-prob -inf (a masked logit); the aggregated loss stays finite."""
    logp = torch.tensor([[-0.5, -math.inf], [-math.inf, -math.inf]])  # row 1 entirely masked
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([[2.0, 0.0], [0.0, 0.0]]), 0.2, 0.2)
    for mode in AGG_MODES:
        got = aggregate(loss, mask, mode, norm_len=2.0)
        want = {"token-mean": -2.0, "seq-mean-token-mean": -1.0, "seq-mean-token-sum-norm": -0.5}[mode]
        assert got.item() == want, (mode, got)


@st.composite
def flagged_episodes(draw):
    """Random terminated/truncated flags, explicit next_values, junk at every masked position."""
    dtype = draw(DTYPES)
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))

    def bools():
        return torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)

    m, term, trunc = bools(), bools(), bools()
    r, v, nv = (tensor(draw(spread_values(B * T, (1.0, 1e6))), dtype, B, T) for _ in range(3))
    return r, v, nv, m, term & ~trunc, trunc, torch.tensor(draw(JUNK), dtype=dtype), draw(st.sampled_from([0.9, 1.0]))


@PROP
@given(flagged_episodes())
def test_returns_and_gae_never_read_masked_positions(ep):
    """Whatever a masked step holds (NaN, ±inf, 1e30) the outputs are those of a zero there."""
    r, v, nv, m, term, trunc, junk, gamma = ep
    clean = [torch.where(m, x, torch.zeros_like(x)) for x in (r, v, nv)]
    dirty = [torch.where(m, x, junk) for x in (r, v, nv)]
    flags = dict(terminated=term, truncated=trunc)
    got = discounted_returns(dirty[0], m, gamma, next_values=dirty[2], **flags)
    assert torch.equal(got, discounted_returns(clean[0], m, gamma, next_values=clean[2], **flags))
    got_a, got_r = gae(*dirty[:2], m, gamma, 0.95, next_values=dirty[2], **flags)
    want_a, want_r = gae(*clean[:2], m, gamma, 0.95, next_values=clean[2], **flags)
    assert torch.equal(got_a, want_a) and torch.equal(got_r, want_r)
    assert torch.isfinite(got_a).all() and (got_a[~m] == 0).all() and (got[~m] == 0).all()


def test_documented_edge_values():
    """The cases above, written out once by hand (fp32 unless said)."""
    one = torch.ones(1, 1)
    # B = 1, T = 1: the return is the reward; GAE's advantage is r - V and its target r
    assert discounted_returns(torch.tensor([[1e6]]), one, 0.99).item() == 1e6
    a, ret = gae(torch.tensor([[1e6]]), torch.tensor([[3.0]]), one, 0.99, 0.95)
    assert (a.item(), ret.item()) == (1e6 - 3.0, 1e6)
    # G = 1: the group mean is the score itself, advantage 0
    s = torch.tensor([0.1, 1e6, -1e30])
    assert torch.equal(group_mean_baseline(s, 1), s)
    # all-equal groups of awkward values: advantage and std exactly 0
    s = torch.full((6,), 0.1)
    for b in (group_mean_baseline(s, 3), leave_one_out_baseline(s, 3), batch_mean_baseline(s)):
        assert torch.equal(s - b, torch.zeros(6))
    assert torch.equal(group_std(s, 3), torch.zeros(6))
    # 1e6 + small differences keep their precision: the std of {1e6 + 0.0625, 1e6, 1e6, 1e6} is 0.03125
    s = torch.tensor([1e6 + 0.0625, 1e6, 1e6, 1e6])
    assert group_std(s, 4)[0].item() == pytest.approx(0.03125, rel=1e-6)
    assert masked_whiten(s, torch.ones(4), eps=0.0).tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-6)
    # whitening a constant 1e6 gives exactly 0; 1e30 in fp32 whitens like 1
    assert torch.equal(masked_whiten(torch.full((5,), 1e6), torch.ones(5)), torch.zeros(5))
    x = torch.tensor([1.0, -1.0, 0.5, 0.0])
    torch.testing.assert_close(masked_whiten(x * 1e30, torch.ones(4)), masked_whiten(x, torch.ones(4), eps=0.0))
    # a fully masked batch: every reduction is 0, whatever the masked positions hold
    z = torch.zeros(2, 3)
    x = torch.full((2, 3), math.nan)
    assert masked_mean(x, z) == 0 and masked_var(x, z) == 0 and torch.equal(masked_whiten(x, z), z)
    assert all(aggregate(x, z, mode, norm_len=3) == 0 for mode in AGG_MODES)
