"""Gradient variance measured against closed forms: a one-step bandit with a softmax policy.

The policy is π = softmax(θ) over A arms, arm a pays r_a (deterministic). One sample's score
is s = ∇_θ log π(a) = e_a - π, and the true gradient is m = ∇J = Σ_a π_a r_a s_a = π ⊙ (r - ρ),
ρ = Σ_a π_a r_a. A batch of N samples gives ĝ = (1/N) Σ_i A_i s_i (the loss's gradient is -ĝ).
With c_a = ||e_a - π||² = 1 - 2π_a + ||π||²:

* constant baseline b (b = 0: no baseline), N i.i.d. samples:
      tr Cov ĝ = (1/N) [ Σ_a π_a (r_a - b)² c_a - ||m||² ]
* leave-one-out over a group of G: ĝ = 1/(G(G-1)) Σ_{i≠j} h(x_i, x_j), a U-statistic of the
  symmetric kernel h(x, y) = ½ (r_x - r_y)(s_x - s_y), E h = m. Hoeffding's variance of a
  U-statistic of order 2 (trace form):
      tr Cov ĝ = 2 / (G(G-1)) · [ 2(G-2) ζ1 + ζ2 ]
      ζ1 = E||h1(x)||² - ||m||²,  h1(x) = E_y h(x, y) = ½ [ (r_x - ρ) s_x + m ]
      ζ2 = E||h(x, y)||² - ||m||²,  E||h||² = ¼ Σ_{a,b} π_a π_b (r_a - r_b)² ||e_a - e_b||²
* the mean over the whole group as baseline (batch mean over N, or group mean over G): since
  r_i - mean = ((G-1)/G)(r_i - mean_{-i}), ĝ = ((G-1)/G) ĝ_loo: variance ((G-1)/G)² that of the
  leave-one-out estimator, and its mean ((G-1)/G) m: the one baseline here that shrinks the gradient.
* P groups of G: the groups are i.i.d., so a group estimator's variance is divided by P.

The closed forms are first checked by exact enumeration of every outcome, then the measured
variance of pg-lm variance's pipeline (pg_lm/lm/estimate.py advantages, the core policy loss,
the K-batch moments of pg_lm/run/variance.py) against them, within the sampling error of the
variance estimate itself.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pg_lm.core import aggregate, debiased_snr, gradient_moments, gradient_summary, policy_loss
from pg_lm.lm import estimate
from pg_lm.lm.variance import ESTIMATORS
from pg_lm.run.variance import markdown_table, measure, write_report

THETA = np.array([0.4, -0.3, 0.8, 0.0])
REWARD = np.array([3.0, 1.0, 2.0, 5.0])  # all positive: no baseline is then much noisier
PI = np.exp(THETA) / np.exp(THETA).sum()
RHO = float(PI @ REWARD)
M = PI * (REWARD - RHO)  # the true gradient ∇J
EYE = np.eye(len(PI))


def var_constant(b: float, n: int) -> float:
    c = 1 - 2 * PI + PI @ PI
    return float((PI * (REWARD - b) ** 2 * c).sum() - M @ M) / n


def var_loo(g: int) -> float:
    h1 = [0.5 * ((REWARD[a] - RHO) * (EYE[a] - PI) + M) for a in range(len(PI))]
    zeta1 = sum(PI[a] * h1[a] @ h1[a] for a in range(len(PI))) - M @ M
    eh2 = sum(PI[a] * PI[b] * (REWARD[a] - REWARD[b]) ** 2 * 2.0 for a in range(len(PI)) for b in range(len(PI)) if a != b) / 4
    zeta2 = eh2 - M @ M
    return float(2 / (g * (g - 1)) * (2 * (g - 2) * zeta1 + zeta2))


def var_mean_baseline(g: int) -> float:
    return ((g - 1) / g) ** 2 * var_loo(g)


def closed_form(name: str, groups: int, g: int, shift: float = 0.0) -> float:
    """tr Cov of the batch estimate of ``name`` for ``groups`` prompts of ``g`` samples."""
    if name == "none":
        return var_constant(shift, groups * g)
    if name == "loo":
        return var_loo(g) / groups
    if name == "group_mean":
        return var_mean_baseline(g) / groups
    if name == "batch_mean":
        return var_mean_baseline(groups * g)
    raise KeyError(name)


def direct_estimate(arms, name: str, groups: int, g: int) -> np.ndarray:
    """ĝ of one batch of arms (groups * g,), written out by hand (no library code)."""
    r = REWARD[list(arms)].reshape(groups, g)
    if name == "none":
        adv = r
    elif name == "loo":
        adv = r - (r.sum(1, keepdims=True) - r) / (g - 1)
    elif name == "group_mean":
        adv = r - r.mean(1, keepdims=True)
    else:
        adv = r - r.mean()
    s = EYE[list(arms)] - PI  # (N, A)
    return (adv.reshape(-1, 1) * s).mean(0)


@pytest.mark.parametrize("name,groups,g", [("none", 1, 3), ("loo", 1, 3), ("group_mean", 1, 3), ("loo", 2, 2),
                                           ("group_mean", 2, 2), ("batch_mean", 2, 2), ("loo", 1, 4)])
def test_the_closed_forms_are_the_exact_variance(name, groups, g):
    """Every outcome enumerated: the exact tr Cov of ĝ equals the formula (and the mean, m or its shrinkage)."""
    n, mean, second = groups * g, np.zeros(len(PI)), 0.0
    for arms in itertools.product(range(len(PI)), repeat=n):
        p = float(np.prod(PI[list(arms)]))
        est = direct_estimate(arms, name, groups, g)
        mean += p * est
        second += p * est @ est
    assert second - mean @ mean == pytest.approx(closed_form(name, groups, g), rel=1e-10)
    shrink = {"none": 1.0, "loo": 1.0, "group_mean": (g - 1) / g, "batch_mean": (n - 1) / n}[name]
    np.testing.assert_allclose(mean, shrink * M, atol=1e-12)


GROUPS, G, K = 2, 4, 1500
NAMES = ["none", "constant", "batch_mean", "group_mean", "loo"]


def bandit_gradients(arms: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The loss gradient of each estimator on one batch of arms (B,), through the LM backend's
    advantage code (pg_lm/lm/estimate.py, the registry's flags) and the core policy loss: each
    completion is one token whose reward sits on it. "constant": no baseline on r - ρ."""
    theta = torch.tensor(THETA, requires_grad=True)
    mask = torch.ones(len(arms), 1, dtype=theta.dtype)
    out = {}
    for name in names:
        logp = torch.log_softmax(theta, 0)[arms][:, None]  # (B, 1): a forward per estimator, as the trainer's
        est = ESTIMATORS["none" if name == "constant" else name]
        rewards = torch.tensor(REWARD)[arms][:, None] - (RHO if name == "constant" else 0.0)  # (B, 1)
        adv, _ = estimate.advantages(est.estimator, est.baseline, rewards, mask, None, G, 1.0, 1.0, est.scale_rewards)
        pg, _ = policy_loss(logp, logp.detach(), adv)
        (grad,) = torch.autograd.grad(aggregate(pg, mask, "token-mean"), theta)
        out[name] = grad
    return out


@pytest.fixture(scope="module")
def bandit_run():
    """K batches of GROUPS x G pulls; every estimator's gradient from the same pulls (recorded)."""
    gen = torch.Generator().manual_seed(0)
    seen: dict[str, list] = {n: [] for n in NAMES}

    def draw(i):
        return torch.multinomial(torch.tensor(PI).expand(GROUPS * G, -1), 1, generator=gen).squeeze(1)  # (B,)

    def gradients(batch, names):
        out = bandit_gradients(batch, names)
        for n in names:
            seen[n].append(out[n])
        return out

    results = measure(draw, gradients, NAMES, K, "loo", 100)
    return results, {n: torch.stack(v[:K]) for n, v in seen.items()}  # (K, A) each (loo: minus the reference's)


@pytest.mark.parametrize("name", NAMES)
def test_the_measured_variance_matches_the_closed_form(bandit_run, name):
    """Within 4 standard errors of the variance estimate (its own sampling error, from the K
    squared distances); the seeds are fixed, so the check is deterministic."""
    results, grads = bandit_run
    want = closed_form("none" if name == "constant" else name, GROUPS, G, RHO if name == "constant" else 0.0)
    sq = ((grads[name] - grads[name].mean(0)) ** 2).sum(1)  # (K,)
    se = float(sq.std()) / math.sqrt(K)
    assert abs(results[name]["variance"] - want) < 4 * se, (results[name]["variance"], want, se)
    assert se < 0.1 * want  # K is large enough for the test to tell the baselines apart


def test_the_baselines_order_as_the_formulas_say(bandit_run):
    results, _ = bandit_run
    v = {n: r["variance"] for n, r in results.items()}
    assert v["none"] > 3 * v["constant"] and v["none"] > 3 * v["loo"]
    assert v["group_mean"] < v["loo"]  # the shrunk estimator: smaller variance, and a biased mean (below)


@pytest.mark.parametrize("name,shrink", [("none", 1.0), ("constant", 1.0), ("loo", 1.0),
                                         ("group_mean", (G - 1) / G), ("batch_mean", (GROUPS * G - 1) / (GROUPS * G))])
def test_the_baselines_do_not_change_the_mean_gradient(bandit_run, name, shrink):
    """The mean over K batches is -m (the loss's gradient) for the unbiased baselines, within 4.5
    standard errors per coordinate; the mean baselines shrink it by (n-1)/n, as derived above."""
    _, grads = bandit_run
    mean, se = grads[name].mean(0), grads[name].std(0) / math.sqrt(K)  # (A,)
    want = -shrink * torch.tensor(M)
    assert bool(((mean - want).abs() < 4.5 * se).all()), (mean, want, se)


def test_the_cosine_to_the_reference_is_near_one_for_unbiased_estimators(bandit_run):
    results, _ = bandit_run
    for name in ("none", "constant", "loo", "group_mean", "batch_mean"):
        assert results[name]["cosine"] > 0.99


def test_streaming_moments_equal_the_batch_formula_and_the_summary_is_right():
    grads = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 2.0
    res = measure(lambda i: grads[i], lambda b, n: {"x": b}, ["x"], 7, "x", 0)["x"]
    mean, var = gradient_moments(grads)
    assert res["variance"] == pytest.approx(var, rel=1e-12)
    assert var == pytest.approx(float(((grads - grads.mean(0)) ** 2).sum()) / 6, rel=1e-12)
    assert res["mean_norm"] == pytest.approx(float(mean.norm()), rel=1e-12)
    assert "cosine" not in res
    s = gradient_summary(torch.tensor([3.0, 4.0]), 4.0, torch.tensor([0.0, 2.0]))
    assert (s["mean_norm"], s["snr"], s["cosine"]) == (5.0, 2.5, pytest.approx(0.8))
    assert gradient_summary(torch.ones(2), 0.0, torch.ones(2))["snr"] == math.inf
    zero = gradient_summary(torch.zeros(2), 0.0, torch.ones(2))  # every batch gave 0 (no reward spread)
    assert math.isnan(zero["snr"]) and math.isnan(zero["cosine"])


def test_debiased_snr_by_hand_and_unbiased_for_the_squared_signal():
    """||ḡ||² - V/K is unbiased for ||E ĝ||²: Gaussian estimates around a known mean, K = 8; the plain
    ||ḡ||² overstates it by tr Cov / K (here 50 / 8)."""
    assert debiased_snr(5.0, 4.0, 4) == pytest.approx(math.sqrt(24.0) / 2.0)  # √(25 - 4/4) / √4
    assert debiased_snr(0.5, 4.0, 4) == 0.0  # the noise accounts for all of ||ḡ||
    assert debiased_snr(1.0, 0.0, 4) == math.inf and math.isnan(debiased_snr(0.0, 0.0, 4))
    with pytest.raises(ValueError, match="K >= 2"):
        debiased_snr(1.0, 1.0, 1)
    gen = torch.Generator().manual_seed(0)
    mu = torch.zeros(50, dtype=torch.float64)
    mu[0] = 1.0  # ||E ĝ||² = 1, tr Cov = 50
    debiased, plain = [], []
    for _ in range(400):
        grads = mu + torch.randn(8, 50, dtype=torch.float64, generator=gen)
        s = measure(lambda i: grads[i], lambda b, n: {"x": b}, ["x"], 8, "x", 0)["x"]
        assert s["snr_debiased"] == debiased_snr(s["mean_norm"], s["variance"], 8)
        debiased.append(s["mean_norm"] ** 2 - s["variance"] / 8)  # the square under the root, before the clip at 0
        plain.append(s["mean_norm"] ** 2)
    # each draw's s.d. is about 1.5, so the mean of 400 is within 0.25 of its expectation (> 3 s.e.)
    assert sum(debiased) / 400 == pytest.approx(1.0, abs=0.25)
    assert sum(plain) / 400 == pytest.approx(1.0 + 50 / 8, abs=0.25)


def test_measure_refuses_fewer_than_two_batches():
    with pytest.raises(ValueError, match="--batches must be >= 2"):
        measure(lambda i: None, lambda b, n: {}, ["x"], 1, "x", 0)


def test_the_report_writes_a_table_json_and_plot(tmp_path):
    results = {"none": {"variance": 2.0, "mean_norm": 1.0, "snr": 0.7071, "snr_debiased": 0.5, "cosine": 0.9},
               "loo": {"variance": 0.5, "mean_norm": 1.0, "snr": 1.414, "snr_debiased": 1.2, "cosine": math.nan}}
    table = write_report(results, {"backend": "test"}, str(tmp_path), "t")
    assert table == markdown_table(results)
    assert table.splitlines()[2] == "| none | 2 | 1 | 0.7071 | 0.5 | 0.9 |"
    assert "| loo | 0.5 | 1 | 1.414 | 1.2 | nan |" in table
    import json

    saved = json.loads((tmp_path / "variance.json").read_text())
    assert saved["backend"] == "test" and saved["results"]["loo"]["cosine"] is None
    assert (tmp_path / "variance.png").stat().st_size > 1000
