"""Evaluation metrics: pure functions of counts."""

from __future__ import annotations

import torch
from torch import Tensor


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
