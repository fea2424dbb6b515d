"""pg_lm/core/masked.py against numbers computed by hand for small cases.

The reference-loop comparisons on random inputs live in test_core_reference.py.
"""

from __future__ import annotations

import math

import torch

from pg_lm.core import masked_mean, masked_sum, masked_var, masked_whiten

# x and mask used by most hand tests; unmasked values are 1, 2, 4.
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)  # (B=2, T=3)
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (B, T)
MEAN = 7.0 / 3.0  # (1 + 2 + 4) / 3 unmasked positions
SQ = (1 - MEAN) ** 2 + (2 - MEAN) ** 2 + (4 - MEAN) ** 2  # = 14 / 3


def close(got, want, tol=1e-12):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


def test_masked_sum_hand_numbers():
    close(masked_sum(X, M), 7.0)
    close(masked_sum(X, M, dim=1), [3.0, 4.0])
    close(masked_sum(X, M, dim=0), [5.0, 2.0, 0.0])


def test_masked_mean_divides_by_mask_count():
    # Denominator = number of unmasked positions (3), not numel (6) nor T.
    close(masked_mean(X, M), 7.0 / 3.0)
    close(masked_mean(X, M, dim=1), [3.0 / 2.0, 4.0 / 1.0])
    # Column 2 is fully masked: 0, not NaN.
    close(masked_mean(X, M, dim=0), [5.0 / 2.0, 2.0 / 1.0, 0.0])


def test_masked_mean_bool_mask_equals_float_mask():
    close(masked_mean(X, M.bool()), 7.0 / 3.0)
    close(masked_mean(X, M.bool(), dim=1), [1.5, 4.0])
    close(masked_sum(X, M.bool()), 7.0)


def test_masked_mean_broadcast_row_mask():
    # A (B, 1) mask selects whole rows: row 0 only -> (1 + 2 + 3) / 3.
    close(masked_mean(X, torch.tensor([[1.0], [0.0]], dtype=torch.float64)), 2.0)


def test_masked_mean_all_zero_mask_is_zero_not_nan():
    z = torch.zeros_like(M)
    close(masked_mean(X, z), 0.0)
    close(masked_mean(X, z, dim=1), [0.0, 0.0])


def test_masked_var_unbiased_and_biased():
    close(masked_var(X, M), SQ / 2.0)  # n - 1 = 2  -> 7/3
    close(masked_var(X, M, unbiased=False), SQ / 3.0)  # n = 3 -> 14/9
    close(masked_var(X, M), 7.0 / 3.0)
    close(masked_var(X, M, unbiased=False), 14.0 / 9.0)


def test_masked_var_degenerate_masks():
    close(masked_var(X, torch.zeros_like(M)), 0.0)  # no positions: 0, not NaN
    one = torch.zeros_like(M)
    one[1, 2] = 1.0
    close(masked_var(X, one), 0.0)  # a single position: 0, not NaN / inf


def test_masked_whiten_hand_numbers():
    std = math.sqrt(7.0 / 3.0 + 1e-8)  # unbiased variance + eps
    want = [[(1 - MEAN) / std, (2 - MEAN) / std, 0.0], [(4 - MEAN) / std, 0.0, 0.0]]
    close(masked_whiten(X, M), want, tol=1e-9)
    # numerically: (-0.8729, -0.2182, 0 / 1.0911, 0, 0)
    close(masked_whiten(X, M)[0, 0], -0.872871560, tol=1e-8)


def test_masked_whiten_scale_only_adds_mean_back():
    std = math.sqrt(7.0 / 3.0 + 1e-8)
    want = [[(1 - MEAN) / std + MEAN, (2 - MEAN) / std + MEAN, 0.0], [(4 - MEAN) / std + MEAN, 0.0, 0.0]]
    close(masked_whiten(X, M, shift_mean=False), want, tol=1e-9)


def test_masked_whiten_masked_positions_and_zero_mask_give_zero():
    # Large values at masked positions must not leak into the statistics or the output.
    x = X.clone()
    x[M == 0] = 1e6
    close(masked_whiten(x, M), masked_whiten(X, M), tol=1e-9)
    out = masked_whiten(X, torch.zeros_like(M))
    assert torch.isfinite(out).all()
    close(out, torch.zeros_like(X))


def test_masked_whiten_result_has_zero_mean_unit_unbiased_var():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 5
    m = (torch.rand(4, 7, generator=g) < 0.6).double()
    w = masked_whiten(x, m, eps=0.0)
    vals = x[m.bool()]
    want = (vals - vals.mean()) / vals.std()  # torch.std is unbiased
    close(w[m.bool()], want, tol=1e-10)
    close(w[~m.bool()], torch.zeros(int((m == 0).sum()), dtype=torch.float64))


def test_non_finite_values_at_masked_positions_are_ignored():
    x = torch.tensor([[1.0, 3.0, float("inf")], [2.0, float("nan"), float("-inf")]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sum(x, m).item() == 6.0
    assert masked_mean(x, m).item() == 2.0
