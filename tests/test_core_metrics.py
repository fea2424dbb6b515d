"""pass@k (Chen et al. 2021) against hand-computed values and the binomial formula."""

from __future__ import annotations

import math

import pytest
import torch

from pg_lm.core import pass_at_k


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
