"""Metrics: pass@k from counts (evaluation), the critic's explained variance (training)."""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import masked_var


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """How much of the returns' variance the critic accounts for, over unmasked positions::

        EV = 1 - Var[R - V] / Var[R]

    1: V predicts every return; 0: no better than a constant; < 0: worse than one. A constant
    offset in V is not seen (Var[R - V] ignores it). Both variances are :func:`masked_var`'s
    (the same n - 1 divisor, which cancels), so padding -- even inf or NaN there -- never enters.
    When the returns have zero variance (a constant, one position, or none) the ratio is
    undefined and the result is NaN, not a number that would read as a verdict on the critic.

    ``values`` V(s_t) and ``returns`` R_t (the critic's targets) are (B, T) (or any shape),
    ``mask`` broadcastable to them. Returns a 0-dim tensor of their dtype.

    >>> V, R = torch.tensor([[1.0, 2.0, 2.0, 9.0]]), torch.tensor([[1.0, 3.0, 5.0, 0.0]])
    >>> round(float(explained_variance(V, R, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))), 4)  # 1 - (7/3) / 4
    0.4167
    """
    if values.shape != returns.shape:
        raise ValueError(f"values and returns must have the same shape, got {tuple(values.shape)} and "
                         f"{tuple(returns.shape)}")
    var_r = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    nan = torch.full((), float("nan"), dtype=var_r.dtype, device=var_r.device)
    return torch.where(var_r > 0, 1.0 - var_res / torch.where(var_r > 0, var_r, torch.ones_like(var_r)), nan)


def pass_at_k(num_samples: Tensor, num_correct: Tensor, k: int) -> Tensor:
    """Unbiased pass@k per problem (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", eq. 1): the chance that at least one of k completions drawn without replacement from the
    n sampled is correct, given c of the n are::

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    computed as the product (their numerically stable form); 1 when n - c < k. Shapes:
    ``num_samples`` n and ``num_correct`` c are (N,) integer counts with 0 <= c <= n and
    k <= n; returns (N,) float64. The mean over problems is the benchmark's pass@k.

    >>> pass_at_k(torch.tensor([2, 5, 5]), torch.tensor([1, 2, 0]), 2).tolist()
    [1.0, 0.7, 0.0]
    """
    if num_samples.shape != num_correct.shape or num_samples.dim() != 1:
        raise ValueError(f"num_samples and num_correct must be the same (N,) shape, got "
                         f"{tuple(num_samples.shape)} and {tuple(num_correct.shape)}")
    n, c = num_samples.long(), num_correct.long()
    if bool((c < 0).any()) or bool((c > n).any()):
        raise ValueError("need 0 <= num_correct <= num_samples")
    if k < 1 or bool((n < k).any()):
        raise ValueError(f"k must be in [1, num_samples], got k={k} with num_samples down to {int(n.min())}")
    out = torch.ones(n.shape, dtype=torch.float64, device=n.device)
    for j in range(len(n)):  # (N is the number of problems: a loop over Python ints is exact and cheap)
        nj, cj = int(n[j]), int(c[j])
        if nj - cj >= k:
            i = torch.arange(nj - cj + 1, nj + 1, dtype=torch.float64, device=n.device)
            out[j] = 1.0 - torch.prod(1.0 - k / i)
    return out
