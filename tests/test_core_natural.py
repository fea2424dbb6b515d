"""The natural-gradient pieces of TRPO against references: torch.linalg.solve for conjugate
gradient, the explicit autograd Hessian for the Fisher-vector product, torch.distributions
for the exact KLs, and hand-computed line searches."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import hessian

from pg_lm.core import (backtracking_line_search, categorical_kl, conjugate_gradient, fisher_vector_product,
                        flat_grad, gaussian_kl, step_scale)

D = torch.float64


def _spd(p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=g, dtype=D)
    return a @ a.T + 0.5 * torch.eye(p, dtype=D)  # (P, P) symmetric positive definite


def test_conjugate_gradient_matches_linalg_solve():
    f = _spd(12)
    g = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=D)
    x = conjugate_gradient(lambda v: f @ v, g, iters=12)  # P iterations: exact in exact arithmetic
    torch.testing.assert_close(x, torch.linalg.solve(f, g), rtol=1e-8, atol=1e-8)


def test_conjugate_gradient_first_iteration_is_a_line_minimisation_along_g():
    # by hand: x1 = (gᵀg / gᵀFg) g
    f = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=D)
    g = torch.tensor([1.0, 1.0], dtype=D)
    x = conjugate_gradient(lambda v: f @ v, g, iters=1)
    torch.testing.assert_close(x, torch.tensor([2.0 / 6.0, 2.0 / 6.0], dtype=D))


def test_conjugate_gradient_stops_on_a_zero_gradient_and_counts_calls():
    calls = []
    x = conjugate_gradient(lambda v: calls.append(1) or v, torch.zeros(5, dtype=D), iters=10)
    assert torch.equal(x, torch.zeros(5, dtype=D)) and not calls
    conjugate_gradient(lambda v: calls.append(1) or _spd(5) @ v, torch.ones(5, dtype=D), iters=3)
    assert len(calls) == 3, "one Fisher-vector product per iteration, at most iters"


def test_step_scale_puts_the_quadratic_kl_at_max_kl():
    x = torch.tensor([1.0, 0.0], dtype=D)
    fx = torch.tensor([2.0, 0.0], dtype=D)  # F = diag(2, .): xᵀFx = 2
    beta = step_scale(x, fx, 0.01)
    assert beta == pytest.approx(math.sqrt(2 * 0.01 / 2.0)) == pytest.approx(0.1)
    assert 0.5 * beta**2 * float(x @ fx) == pytest.approx(0.01)


def test_line_search_backs_off_until_the_kl_is_within_the_bound():
    # KL(f) = 0.04 f²: 1, .8, .64, .512 give .04, .0256, .0164, .0105 > .01; .8⁴ = .4096 gives .0067
    seen = []

    def evaluate(f):
        seen.append(f)
        return 1.0, 0.04 * f * f

    assert backtracking_line_search(evaluate, max_kl=0.01, steps=10, ratio=0.8) == pytest.approx(0.8**4)
    assert seen == pytest.approx([1.0, 0.8, 0.64, 0.512, 0.4096])


def test_line_search_accepts_the_full_step_when_it_improves_within_the_bound():
    assert backtracking_line_search(lambda f: (0.3 * f, 0.005 * f), max_kl=0.01) == 1.0


def test_line_search_needs_an_improvement():
    # gain f - 2f² is > 0 only for f < 0.5: the first such fraction of 0.8^k is 0.8⁴ = 0.4096
    assert backtracking_line_search(lambda f: (f - 2 * f * f, 0.0), 0.01, 10, 0.8) == pytest.approx(0.8**4)
    # never an improvement (or a KL that never fits in the steps given): rejected
    assert backtracking_line_search(lambda f: (-f, 0.0), 0.01, 10, 0.8) is None
    assert backtracking_line_search(lambda f: (1.0, 1.0 * f), 0.01, 3, 0.5) is None


def test_line_search_never_accepts_a_non_finite_point():
    # an overflowing ratio gives an infinite "improvement", a broken KL nan: back off past both
    values = {1.0: (math.inf, 0.0), 0.5: (1.0, math.nan), 0.25: (math.nan, 0.0), 0.125: (0.1, 0.001)}
    assert backtracking_line_search(lambda f: values[f], 0.01, 4, 0.5) == 0.125


def _tiny_policy(kind: str):
    """A linear policy on N=7 fixed states, its flat parameters θ (P,) and a function θ -> the
    exact mean KL(π_old || π_θ), with π_old the policy at θ_old (detached)."""
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(7, 3, generator=g, dtype=D)  # (N, D)
    w = (0.5 * torch.randn(2, 3, generator=g, dtype=D)).requires_grad_()
    log_std = torch.tensor([-0.3, 0.2], dtype=D, requires_grad=True)
    params = [w] + ([log_std] if kind == "gaussian" else [])
    sizes = [p.numel() for p in params]

    def kl_of(*ps):
        out = obs @ ps[0].T  # (N, A)
        if kind == "categorical":
            return categorical_kl(old_out, out).mean()
        return gaussian_kl(old_out, old_log_std, out, ps[1]).mean()

    with torch.no_grad():
        old_out, old_log_std = obs @ w.T, log_std.clone()

    def kl_flat(theta):
        return kl_of(*[c.view_as(p) for c, p in zip(theta.split(sizes), params)])

    return params, kl_of, kl_flat


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_fisher_vector_product_equals_the_explicit_kl_hessian(kind):
    params, kl_of, kl_flat = _tiny_policy(kind)
    theta = torch.cat([p.detach().reshape(-1) for p in params])  # (P,)
    h = hessian(kl_flat, theta)  # (P, P) the KL's Hessian at θ_old: the Fisher matrix
    assert torch.linalg.eigvalsh(h).min() > -1e-10, "a Fisher matrix is positive semi-definite"
    fvp = fisher_vector_product(lambda: kl_of(*params), params, damping=0.1)
    for seed in range(3):
        v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(seed), dtype=D)
        torch.testing.assert_close(fvp(v), h @ v + 0.1 * v, rtol=1e-9, atol=1e-12)


def test_categorical_fisher_is_the_score_outer_product():
    # Hessian of KL at θ_old = E_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ (Fisher information)
    params, kl_of, kl_flat = _tiny_policy("categorical")
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    w = params[0]
    obs = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=D)
    fisher = torch.zeros(theta.numel(), theta.numel(), dtype=D)
    for s in obs:
        logp = torch.log_softmax(w @ s, -1)
        for a in range(2):
            score = flat_grad(logp[a], [w], retain_graph=True)
            fisher += logp[a].exp().detach() * torch.outer(score, score) / len(obs)
    torch.testing.assert_close(hessian(kl_flat, theta), fisher, rtol=1e-9, atol=1e-12)


def test_conjugate_gradient_on_fisher_products_matches_solve():
    params, kl_of, kl_flat = _tiny_policy("gaussian")
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    f = hessian(kl_flat, theta) + 0.1 * torch.eye(theta.numel(), dtype=D)
    g = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(5), dtype=D)
    x = conjugate_gradient(fisher_vector_product(lambda: kl_of(*params), params, 0.1), g, iters=theta.numel())
    torch.testing.assert_close(x, torch.linalg.solve(f, g), rtol=1e-7, atol=1e-9)


def test_exact_kls_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                            torch.distributions.Categorical(logits=b))
    torch.testing.assert_close(categorical_kl(a, b), ref)
    m0, m1, s0, s1 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g), torch.randn(2), torch.randn(2)
    normal = lambda m, s: torch.distributions.Independent(torch.distributions.Normal(m, s.exp().expand_as(m)), 1)
    ref = torch.distributions.kl_divergence(normal(m0, s0), normal(m1, s1))
    torch.testing.assert_close(gaussian_kl(m0, s0, m1, s1), ref)
    assert torch.allclose(gaussian_kl(m0, s0, m0, s0), torch.zeros(5)), "KL(p || p) = 0"


@pytest.mark.parametrize("call, match", [
    (lambda: conjugate_gradient(lambda v: v, torch.ones(3), iters=0), "iterations must be >= 1"),
    (lambda: conjugate_gradient(lambda v: v, torch.ones(2, 3)), "flat vector"),
    (lambda: step_scale(torch.ones(3), torch.ones(3), 0.0), "max_kl must be > 0"),
    (lambda: step_scale(torch.ones(3), -torch.ones(3), 0.01), "must be > 0 to scale"),
    (lambda: step_scale(torch.ones(3), torch.ones(2), 0.01), "equal flat vectors"),
    (lambda: backtracking_line_search(lambda f: (1, 0), 0.01, steps=0), "steps must be >= 1"),
    (lambda: backtracking_line_search(lambda f: (1, 0), 0.01, ratio=1.0), "ratio must be in"),
    (lambda: categorical_kl(torch.ones(2, 3), torch.ones(2, 4)), "shape mismatch"),
    (lambda: fisher_vector_product(lambda: torch.ones(()), [torch.ones(1, requires_grad=True)], -1.0), "damping"),
])
def test_bad_input_is_one_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
