"""pass@k (Chen et al. 2021) against hand-computed values and the binomial formula; the critic's
explained variance against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.core import explained_variance, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0), (1, 1, 1, 1.0),
    (2, 1, 1, 0.5),            # one of two right, one draw
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 1, 0.3),           # pass@1 is the fraction correct
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (4, 3, 2, 1.0),            # n - c < k: every draw of 2 holds a right one
    (8, 0, 8, 0.0),
])
def test_hand_values(n, c, k, expected):
    assert pass_at_k(torch.tensor([n]), torch.tensor([c]), k).tolist() == pytest.approx([expected], abs=1e-12)


def test_matches_the_binomial_formula_for_every_count():
    n = 12
    c = torch.arange(n + 1)
    for k in range(1, n + 1):
        expected = [1 - math.comb(n - ci, k) / math.comb(n, k) for ci in range(n + 1)]
        assert pass_at_k(torch.full_like(c, n), c, k).tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k, fragment", [
    ([2, 2], [1], 1, "same \\(N,\\) shape"), ([2], [3], 1, "0 <= num_correct <= num_samples"),
    ([2], [1], 3, "k must be in \\[1, num_samples\\]"), ([2], [1], 0, "k must be in"),
])
def test_bad_input_is_named(n, c, k, fragment):
    with pytest.raises(ValueError, match=fragment):
        pass_at_k(torch.tensor(n), torch.tensor(c), k)


# ---------------------------------------------------------------------------- explained_variance
NAN = float("nan")


def test_explained_variance_hand_values():
    """R = (1, 3, 5), V = (1, 2, 2) on the real steps: Var[R] = 8 / 2 = 4 and R - V = (0, 1, 3) has
    mean 4/3 and Var = (16 + 1 + 25) / 9 / 2 = 7/3, so EV = 1 - (7/3) / 4 = 5/12. The padded
    step holds inf / NaN, which must not reach the result."""
    R = torch.tensor([[1.0, 3.0, 5.0, NAN]], dtype=torch.float64)
    V = torch.tensor([[1.0, 2.0, 2.0, math.inf]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    ev = explained_variance(V, R, m)
    assert ev.shape == () and ev.dtype == torch.float64
    assert float(ev) == pytest.approx(5 / 12, abs=1e-12)


def test_explained_variance_over_a_batch_of_rows():
    """(B, T) = (2, 3) with rows of different lengths: the variances pool every real step.
    R = (0, 2 | 4, 6, 8), V = R - (1, -1 | 1, -1, 0): Var[R] = 10, Var[R - V] = 1 (mean 0,
    sum of squares 4, n - 1 = 4), so EV = 1 - 1/10 = 0.9."""
    R = torch.tensor([[0.0, 2.0, 99.0], [4.0, 6.0, 8.0]], dtype=torch.float64)
    V = R - torch.tensor([[1.0, -1.0, 5.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert float(explained_variance(V, R, m)) == pytest.approx(0.9, abs=1e-12)


def test_explained_variance_perfect_constant_and_offset_critics():
    """V = R: 1. V constant: 0 (no better than the mean). V = R + c: 1 (an offset is not seen).
    V = -R: R - V = 2R, so 1 - 4 Var[R] / Var[R] = -3 (worse than a constant)."""
    R = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    m = torch.ones_like(R)
    assert float(explained_variance(R, R, m)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(R, 7.0), R, m)) == pytest.approx(0.0)
    assert float(explained_variance(R + 10.0, R, m)) == pytest.approx(1.0)
    assert float(explained_variance(-R, R, m)) == pytest.approx(-3.0)


@pytest.mark.parametrize("R, m", [
    ([[2.0, 2.0, 2.0]], [[1.0, 1.0, 1.0]]),  # constant returns
    ([[2.0, 5.0, 9.0]], [[1.0, 0.0, 0.0]]),  # one real step
    ([[2.0, 5.0, 9.0]], [[0.0, 0.0, 0.0]]),  # none
])
def test_explained_variance_is_nan_when_the_returns_do_not_vary(R, m):
    """Var[R] = 0 leaves the ratio undefined: NaN, not a number that reads as a verdict."""
    R, m = torch.tensor(R), torch.tensor(m)
    assert math.isnan(explained_variance(torch.zeros_like(R), R, m))


def test_explained_variance_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        explained_variance(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
