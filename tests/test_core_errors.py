"""Shape checks and bad names raise ValueError with a message that says what is wrong."""

from __future__ import annotations

import re

import pytest
import torch

from pg_lm.core import (
    AGG_MODES,
    KL_ESTIMATORS,
    aggregate,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_std,
    kl_estimate,
    leave_one_out_baseline,
    policy_loss,
    value_loss,
)

R = torch.zeros(2, 3)  # (B, T)
M = torch.ones(2, 3)


@pytest.mark.parametrize(
    "kwargs, name, shape",
    [
        (dict(mask=torch.ones(2, 4)), "mask", "(2, 4)"),
        (dict(mask=torch.ones(3)), "mask", "(3,)"),
        (dict(terminated=torch.zeros(3, 3, dtype=torch.bool)), "terminated", "(3, 3)"),
        (dict(truncated=torch.zeros(2, 2, dtype=torch.bool)), "truncated", "(2, 2)"),
        (dict(next_values=torch.zeros(2, 4)), "next_values", "(2, 4)"),
    ],
)
def test_discounted_returns_shape_errors(kwargs, name, shape):
    args = dict(mask=M) | kwargs
    with pytest.raises(ValueError, match=re.escape(f"{name} has shape {shape}, expected (2, 3)")):
        discounted_returns(R, gamma=0.9, **args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(values=torch.zeros(2, 2)), "values"),
        (dict(values=torch.zeros(3)), "values"),
        (dict(mask=torch.ones(3, 2)), "mask"),
        (dict(terminated=torch.zeros(2, 4, dtype=torch.bool)), "terminated"),
        (dict(truncated=torch.zeros(1, 3, dtype=torch.bool)), "truncated"),
        (dict(next_values=torch.zeros(2, 3, 1)), "next_values"),
    ],
)
def test_gae_shape_errors(kwargs, name):
    args = dict(values=torch.zeros(2, 3), mask=M) | kwargs
    with pytest.raises(ValueError, match=rf"^{name} has shape .*expected \(2, 3\)"):
        gae(R, gamma=0.9, lam=0.95, **args)


@pytest.mark.parametrize("fn", [group_mean_baseline, group_std, leave_one_out_baseline])
def test_group_baselines_reject_scores_that_do_not_split(fn):
    with pytest.raises(ValueError, match=r"do not split into groups of 4"):
        fn(torch.zeros(6), 4)  # 6 samples, G = 4
    with pytest.raises(ValueError, match=r"do not split into groups of 2"):
        fn(torch.zeros(2, 4), 2)  # scores must be (B,), not (B, T)


@pytest.mark.parametrize("fn", [group_std, leave_one_out_baseline])
def test_group_std_and_loo_need_two_samples(fn):
    with pytest.raises(ValueError, match=r"group_size >= 2"):
        fn(torch.zeros(4), 1)


def test_group_size_zero_is_a_value_error():
    with pytest.raises(ValueError, match="group"):
        group_mean_baseline(torch.zeros(4), 0)


def test_bad_kl_estimator_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'") as err:
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    assert all(k in str(err.value) for k in KL_ESTIMATORS)


def test_bad_aggregation_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown loss aggregation 'seq-mean'") as err:
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "seq-mean")
    assert set(AGG_MODES) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"}
    assert all(m in str(err.value) for m in AGG_MODES)


# The loss functions check no shapes: a per-sequence (B,) tensor next to a (B, T) one
# broadcasts along T without a word when B == T (here 3 == 3) and gives a wrong number.
LOSS_SHAPE_CASES = {
    "aggregate-mask": lambda: aggregate(torch.ones(3, 3), torch.tensor([1.0, 1.0, 0.0])),
    "policy_loss-advantages": lambda: policy_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.ones(3)),
    "value_loss-returns": lambda: value_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.ones(3)),
    "kl_estimate-ref_logp": lambda: kl_estimate(torch.zeros(3, 3), torch.zeros(3)),
}


@pytest.mark.parametrize("case", list(LOSS_SHAPE_CASES))
def test_loss_functions_reject_mismatched_shapes(case):
    with pytest.raises(ValueError, match="shape"):
        LOSS_SHAPE_CASES[case]()
