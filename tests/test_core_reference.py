"""Every vectorised core function against a plain Python loop.

The reference implementations below work on nested lists of Python floats, one scalar
at a time, and are written from the documented definitions rather than from the
vectorised code: returns and GAE are computed *forwards* (for each t, walk the episode
to its end and sum the discounted terms, O(T^2)), variances come from the `statistics`
module, the PPO clip is written piecewise in the sign of A, and so on.

Also here: the GAE lambda = 1 / lambda = 0 identities and the micro-batch invariance of
`aggregate` (value and gradient).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_lm.core import (
    AGG_MODES,
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

F = torch.float64
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
UNIT = st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False)


def T_(rows, dtype=F):
    return torch.tensor(rows, dtype=dtype)


def close(got, want, tol=1e-9):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


def grid(B, T, el):
    return st.lists(st.lists(el, min_size=T, max_size=T), min_size=B, max_size=B)


# =============================================================== episode inputs


@dataclass
class Episodes:
    """Random (B, T) rollout as nested lists; terminated None = the LM default."""

    kind: str
    rewards: list
    values: list
    next_values: list | None
    mask: list  # 0/1 ints
    terminated: list | None  # bools, or None (terminate at the last unmasked step)
    truncated: list | None  # bools, or None (no truncation)
    gamma: float
    lam: float

    def tensors(self):
        opt = lambda x, dt=F: None if x is None else T_(x, dt)  # noqa: E731
        return dict(
            rewards=T_(self.rewards), values=T_(self.values), mask=T_(self.mask),
            terminated=opt(self.terminated, torch.bool), truncated=opt(self.truncated, torch.bool),
            next_values=opt(self.next_values),
        )


@st.composite
def episodes(draw, kind=None, with_next_values=None):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    kind = kind or draw(st.sampled_from(["lm", "gym"]))
    density = draw(st.integers(0, 5))  # episode ends per 10 steps, shrinks to "none"
    flag = st.integers(0, 9).map(lambda k: k < density)
    if kind == "lm":  # right-padded completions: mask is a prefix of ones
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        mask = [[int(t < n) for t in range(T)] for n in lengths]
        terminated = None
        truncated = draw(st.none() | grid(B, T, flag))
    else:  # gym: arbitrary masks (autoreset steps) and done flags anywhere
        mask = draw(grid(B, T, st.integers(0, 9).map(lambda k: int(k >= 2))))
        terminated = draw(grid(B, T, flag))
        truncated = draw(st.none() | grid(B, T, flag))
    use_nv = draw(st.booleans()) if with_next_values is None else with_next_values
    return Episodes(
        kind=kind, rewards=draw(grid(B, T, FLOAT)), values=draw(grid(B, T, FLOAT)),
        next_values=draw(grid(B, T, FLOAT)) if use_nv else None,
        mask=mask, terminated=terminated, truncated=truncated, gamma=draw(UNIT), lam=draw(UNIT),
    )


# ============================================================ reference loops


def ref_last_step(mask):
    T = len(mask[0])
    return [[bool(m[t]) and (t == T - 1 or not m[t + 1]) for t in range(T)] for m in mask]


def _flags(ep):
    B, T = len(ep.mask), len(ep.mask[0])
    trunc = ep.truncated if ep.truncated is not None else [[False] * T for _ in range(B)]
    if ep.terminated is None:  # the LM default: the last unmasked step terminates unless truncated there
        last = ref_last_step(ep.mask)
        term = [[last[b][t] and not trunc[b][t] for t in range(T)] for b in range(B)]
    else:
        term = ep.terminated
    return term, trunc


def _episode_end(ep, term, trunc, b, k):
    """True if nothing is carried from step k + 1 back to step k."""
    T = len(ep.mask[0])
    return term[b][k] or trunc[b][k] or k == T - 1 or not ep.mask[b][k + 1]


def ref_returns(ep):
    """G_t = sum_{k=t}^{end} gamma^(k-t) r_k  (+ gamma^(end-t+1) V(s_end+1) if cut, not terminal)."""
    term, trunc = _flags(ep)
    B, T = len(ep.mask), len(ep.mask[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not ep.mask[b][t]:
                continue
            g, disc, k = 0.0, 1.0, t
            while True:
                g += disc * ep.rewards[b][k]
                if _episode_end(ep, term, trunc, b, k):
                    cut = trunc[b][k] or k == T - 1  # a time limit or the end of the rollout
                    if cut and not term[b][k] and ep.next_values is not None:
                        g += disc * ep.gamma * ep.next_values[b][k]
                    break
                disc *= ep.gamma
                k += 1
            out[b][t] = g
    return out


def ref_gae(ep):
    """A_t = sum_{k=t}^{end} (gamma lam)^(k-t) delta_k; R_t = A_t + V_t; 0 where masked."""
    term, trunc = _flags(ep)
    B, T = len(ep.mask), len(ep.mask[0])
    v = ep.values
    nv = ep.next_values or [[v[b][k + 1] if k < T - 1 else 0.0 for k in range(T)] for b in range(B)]
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not ep.mask[b][t]:
                continue
            a, disc, k = 0.0, 1.0, t
            while True:
                boot = 0.0 if term[b][k] else nv[b][k]
                a += disc * (ep.rewards[b][k] + ep.gamma * boot - v[b][k])
                if _episode_end(ep, term, trunc, b, k):
                    break
                disc *= ep.gamma * ep.lam
                k += 1
            adv[b][t], ret[b][t] = a, a + v[b][t]
    return adv, ret


# ================================================================ returns / GAE


@SETTINGS
@given(ep=episodes())
def test_discounted_returns_matches_loop(ep):
    x = ep.tensors()
    got = discounted_returns(x["rewards"], x["mask"], ep.gamma, x["terminated"], x["truncated"], x["next_values"])
    close(got, ref_returns(ep))


@SETTINGS
@given(ep=episodes())
def test_gae_matches_loop(ep):
    x = ep.tensors()
    adv, ret = gae(x["rewards"], x["values"], x["mask"], ep.gamma, ep.lam,
                   x["terminated"], x["truncated"], x["next_values"])
    want_adv, want_ret = ref_gae(ep)
    close(adv, want_adv)
    close(ret, want_ret)


@SETTINGS
@given(mask=st.integers(1, 8).flatmap(lambda T: grid(3, T, st.integers(0, 1))))
def test_last_step_mask_matches_loop_for_prefix_masks(mask):
    prefix = [sorted(row, reverse=True) for row in mask]  # (1, ..., 1, 0, ..., 0)
    assert last_step_mask(T_(prefix)).tolist() == ref_last_step(prefix)


def _consistent(ep):
    """Make next_values agree with values inside episodes (V(s_{t+1}) = values[t+1] unless the
    episode ends at t), and make every step before a masked step end its episode, as in a
    real rollout. Only then are the lambda = 1 identity's two sides the same quantity."""
    term, trunc = _flags(ep)
    B, T = len(ep.mask), len(ep.mask[0])
    trunc = [row[:] for row in trunc]
    nv = [row[:] for row in ep.next_values]
    for b in range(B):
        for t in range(T - 1):
            if ep.mask[b][t] and not ep.mask[b][t + 1] and not term[b][t]:
                trunc[b][t] = True  # the step before an autoreset / padding step is an episode end
            if not (term[b][t] or trunc[b][t]):
                nv[b][t] = ep.values[b][t + 1]
    ep.truncated, ep.next_values = trunc, nv
    return ep


@SETTINGS
@given(ep=episodes(with_next_values=True))
def test_gae_lambda_one_is_returns_minus_values(ep):
    ep = _consistent(ep)
    x = ep.tensors()
    adv, ret = gae(x["rewards"], x["values"], x["mask"], ep.gamma, 1.0,
                   x["terminated"], x["truncated"], x["next_values"])
    G = discounted_returns(x["rewards"], x["mask"], ep.gamma, x["terminated"], x["truncated"], x["next_values"])
    close(adv, G - x["values"] * x["mask"])
    close(ret, G)


@SETTINGS
@given(ep=episodes())
def test_gae_lambda_zero_is_td_error(ep):
    x = ep.tensors()
    term, _ = _flags(ep)
    B, T = len(ep.mask), len(ep.mask[0])
    v = ep.values
    nv = ep.next_values or [[v[b][k + 1] if k < T - 1 else 0.0 for k in range(T)] for b in range(B)]
    td = [[(ep.rewards[b][t] + ep.gamma * (not term[b][t]) * nv[b][t] - v[b][t]) * ep.mask[b][t]
           for t in range(T)] for b in range(B)]
    adv, _ = gae(x["rewards"], x["values"], x["mask"], ep.gamma, 0.0,
                 x["terminated"], x["truncated"], x["next_values"])
    close(adv, td)


# ============================================================== masked reductions


@st.composite
def masked_inputs(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return draw(grid(B, T, FLOAT)), draw(grid(B, T, st.integers(0, 1)))


@SETTINGS
@given(xm=masked_inputs(), dim=st.sampled_from([None, 0, 1]), as_bool=st.booleans())
def test_masked_sum_and_mean_match_loop(xm, dim, as_bool):
    x, m = xm
    B, T = len(x), len(x[0])
    cells = lambda keep: [(b, t) for b in range(B) for t in range(T) if m[b][t] and keep(b, t)]  # noqa: E731
    groups = {None: [lambda b, t: True], 0: [lambda b, t, j=j: t == j for j in range(T)],
              1: [lambda b, t, i=i: b == i for i in range(B)]}[dim]
    sums = [sum(x[b][t] for b, t in cells(g)) for g in groups]
    means = [s / len(cells(g)) if cells(g) else 0.0 for s, g in zip(sums, groups)]
    mask = T_(m, torch.bool if as_bool else F)
    got_s, got_m = masked_sum(T_(x), mask, dim), masked_mean(T_(x), mask, dim)
    close(got_s, sums[0] if dim is None else sums)
    close(got_m, means[0] if dim is None else means)


@SETTINGS
@given(xm=masked_inputs(), unbiased=st.booleans(), shift=st.booleans())
def test_masked_var_and_whiten_match_statistics_module(xm, unbiased, shift):
    x, m = xm
    vals = [xi for row, mrow in zip(x, m) for xi, mi in zip(row, mrow) if mi]
    if len(vals) == 0:
        var, mean = 0.0, 0.0
    elif len(vals) == 1:
        var, mean = 0.0, vals[0]
    else:
        var = statistics.variance(vals) if unbiased else statistics.pvariance(vals)
        mean = statistics.fmean(vals)
    close(masked_var(T_(x), T_(m), unbiased=unbiased), var, tol=1e-8)
    var_u = statistics.variance(vals) if len(vals) > 1 else 0.0  # whitening uses the unbiased var
    want = [[((xi - mean) / math.sqrt(var_u + 1e-8) + (0.0 if shift else mean)) * mi
             for xi, mi in zip(row, mrow)] for row, mrow in zip(x, m)]
    close(masked_whiten(T_(x), T_(m), shift_mean=shift), want, tol=1e-6)


# ===================================================================== baselines


@SETTINGS
@given(data=st.data(), n_prompts=st.integers(1, 4), G=st.integers(2, 5))
def test_baselines_match_loop(data, n_prompts, G):
    s = data.draw(st.lists(FLOAT, min_size=n_prompts * G, max_size=n_prompts * G))
    B = len(s)
    group = lambda i: s[(i // G) * G:(i // G + 1) * G]  # noqa: E731
    close(batch_mean_baseline(T_(s)), [statistics.fmean(s)] * B)
    close(group_mean_baseline(T_(s), G), [statistics.fmean(group(i)) for i in range(B)])
    close(group_std(T_(s), G), [statistics.stdev(group(i)) for i in range(B)], tol=1e-7)
    loo = [statistics.fmean([s[j] for j in range((i // G) * G, (i // G + 1) * G) if j != i]) for i in range(B)]
    close(leave_one_out_baseline(T_(s), G), loo)


# ======================================================================== losses

LOGP = st.floats(-3.0, 0.0, allow_nan=False, allow_subnormal=False)


@st.composite
def token_grid(draw, *els):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return [draw(grid(B, T, el)) for el in els]


def _map(fn, *grids):
    return [[fn(*vals) for vals in zip(*rows)] for rows in zip(*grids)]


@SETTINGS
@given(g=token_grid(LOGP, LOGP))
def test_kl_estimators_match_loop(g):
    logp, ref = g
    lr = lambda a, b: b - a  # noqa: E731  log(pi_ref / pi)
    close(kl_estimate(T_(logp), T_(ref), "k1"), _map(lambda a, b: -lr(a, b), logp, ref))
    close(kl_estimate(T_(logp), T_(ref), "k2"), _map(lambda a, b: lr(a, b) ** 2 / 2, logp, ref))
    k3 = _map(lambda a, b: math.expm1(lr(a, b)) - lr(a, b), logp, ref)
    close(kl_estimate(T_(logp), T_(ref), "k3"), k3)
    # (k3 >= 0 is checked in test_core_losses.py)


def ref_ppo(lp, olp, a, clip_low, clip_high):
    """PPO's pessimistic objective, piecewise in the sign of A -> (loss, clipped?)."""
    r = math.exp(lp - olp)
    if clip_low is None and clip_high is None:
        return -a * r, 0.0
    hi = math.inf if clip_high is None else 1 + clip_high
    lo = -math.inf if clip_low is None else 1 - clip_low
    if a > 0:  # the gain is capped above: -A min(r, 1 + eps_high)
        return -a * min(r, hi), float(r > hi)
    if a < 0:  # the loss is floored below: |A| max(r, 1 - eps_low)
        return -a * max(r, lo), float(r < lo)
    return 0.0, 0.0


CLIP = st.none() | st.floats(0.05, 0.5)


@SETTINGS
@given(g=token_grid(LOGP, LOGP, FLOAT), clip_low=CLIP, clip_high=CLIP)
def test_policy_loss_matches_loop(g, clip_low, clip_high):
    logp, old, adv = g
    loss, ind = policy_loss(T_(logp), T_(old), T_(adv), clip_low=clip_low, clip_high=clip_high)
    close(loss, _map(lambda *v: ref_ppo(*v, clip_low, clip_high)[0], logp, old, adv))
    close(ind, _map(lambda *v: ref_ppo(*v, clip_low, clip_high)[1], logp, old, adv))


@SETTINGS
@given(g=token_grid(FLOAT, FLOAT, FLOAT), clip=st.none() | st.floats(0.05, 2.0))
def test_value_loss_matches_loop(g, clip):
    v, old, ret = g

    def ref(vi, oi, ri):
        plain = (vi - ri) ** 2
        if clip is None:
            return plain / 2
        vc = oi + min(max(vi - oi, -clip), clip)
        return max(plain, (vc - ri) ** 2) / 2

    close(value_loss(T_(v), T_(old), T_(ret), clip=clip), _map(ref, v, old, ret))


@SETTINGS
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6)))
def test_entropy_matches_loop(data, shape):
    B, T, V = shape
    logits = data.draw(st.lists(grid(T, V, st.floats(-10, 10, allow_subnormal=False)), min_size=B, max_size=B))

    def ref(row):
        mx = max(row)
        z = sum(math.exp(v - mx) for v in row)
        ps = [math.exp(v - mx) / z for v in row]
        return -sum(p * math.log(p) for p in ps if p > 0)

    want = [[ref(row) for row in seq] for seq in logits]
    close(entropy_from_logits(T_(logits)), torch.tensor(want, dtype=torch.float32), tol=1e-5)


@SETTINGS
@given(g=token_grid(FLOAT, st.integers(0, 1)), mode=st.sampled_from(AGG_MODES),
       n_tok=st.none() | st.integers(1, 50), n_seq=st.none() | st.integers(1, 10), norm_len=st.integers(1, 20))
def test_aggregate_matches_loop(g, mode, n_tok, n_seq, norm_len):
    loss, m = g
    total = sum(li * mi for row, mrow in zip(loss, m) for li, mi in zip(row, mrow))
    n_seq_ = len(loss) if n_seq is None else n_seq
    if mode == "token-mean":
        want = total / max(sum(map(sum, m)) if n_tok is None else n_tok, 1)
    elif mode == "seq-mean-token-mean":
        row_means = [sum(l * k for l, k in zip(r, mr)) / sum(mr) if sum(mr) else 0.0 for r, mr in zip(loss, m)]
        want = sum(row_means) / n_seq_
    else:
        want = total / (n_seq_ * norm_len)
    got = aggregate(T_(loss), T_(m), mode, num_tokens=n_tok, num_seqs=n_seq, norm_len=norm_len)
    close(got, want)


# ======================================= micro-batch invariance: parts against the whole


def _trim(mask):
    """Drop trailing all-padding columns, as dynamic padding of a micro-batch would (keep >= 1)."""
    nz = mask.any(0).nonzero()
    return max(int(nz.max()) + 1 if len(nz) else 1, 1)


@st.composite
def split_batches(draw):
    B, T = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    loss = draw(grid(B, T, FLOAT))
    mask = draw(grid(B, T, st.integers(0, 1)))
    cuts = sorted(draw(st.sets(st.integers(1, max(B - 1, 1)), max_size=B - 1))) if B > 1 else []
    return loss, mask, [0, *cuts, B]


@SETTINGS
@given(sb=split_batches(), mode=st.sampled_from(AGG_MODES), trim=st.booleans())
def test_aggregate_micro_batch_invariance_value_and_grad(sb, mode, trim):
    loss_l, mask_l, bounds = sb
    mask = T_(mask_l)
    B, T = mask.shape
    w = T_(loss_l)
    per_token = lambda p: p**2 * w + p  # noqa: E731  a non-linear per-token loss of the params

    p_whole = torch.ones(B, T, dtype=F, requires_grad=True)
    whole = aggregate(per_token(p_whole), mask, mode, norm_len=T)  # this batch's own counts
    whole.backward()

    p_parts = torch.ones(B, T, dtype=F, requires_grad=True)
    total = torch.zeros((), dtype=F)
    n_tok, n_seq = mask.sum().item(), B  # the global counts
    for a, b in zip(bounds[:-1], bounds[1:]):
        Tp = _trim(mask[a:b]) if trim else T
        part = aggregate(per_token(p_parts)[a:b, :Tp], mask[a:b, :Tp], mode,
                         num_tokens=n_tok, num_seqs=n_seq, norm_len=T)
        part.backward()  # gradient accumulation, as a trainer would do it
        total = total + part.detach()
    close(total, whole.detach())
    close(p_parts.grad, p_whole.grad)


def test_aggregate_sum_norm_default_norm_len_is_split_invariant_or_refused():
    loss = T_([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = T_([[1, 1, 1, 1], [1, 1, 0, 0]])
    mode = "seq-mean-token-sum-norm"
    try:
        whole = aggregate(loss, mask, mode)
    except ValueError as err:  # refusing to guess the constant is an acceptable fix
        assert "norm_len" in str(err)
        return
    # micro-batches of one row each, each padded only to its own length
    parts = aggregate(loss[:1], mask[:1], mode, num_seqs=2) + aggregate(loss[1:, :2], mask[1:, :2], mode, num_seqs=2)
    close(parts, whole)  # got 10/8 + 11/4 = 4.0, whole = 21/8 = 2.625
