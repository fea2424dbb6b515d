"""The statistics of benchmarks/lm_reward_per_step.py against values known in closed form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
lm_reward_per_step = pytest.importorskip("lm_reward_per_step")
sign_test = lm_reward_per_step.sign_test


def test_sign_test_counts_and_exact_p():
    # 10 of 10 ahead: p = 2 / 2**10; ties are dropped, not counted for either side
    assert sign_test([0.1] * 10 + [0.0, 0.0]) == dict(seeds_pg_lm_ahead=10, seeds_trl_ahead=0, seeds_tied=2,
                                                      sign_test_p=2 / 1024)
    # 1 ahead, 4 behind: P(X <= 1) for Binomial(5, 1/2) = 6/32, doubled
    assert sign_test([1.0, -1.0, -2.0, -0.5, -0.1])["sign_test_p"] == pytest.approx(12 / 32)
    # symmetric in the two libraries; an even split is p = 1, and so is no decided seed at all
    assert sign_test([1, 1, 1, -1])["sign_test_p"] == sign_test([-1, -1, -1, 1])["sign_test_p"] == pytest.approx(10 / 16)
    assert sign_test([1, -1, 2, -2])["sign_test_p"] == 1.0
    assert sign_test([0.0, 0.0])["sign_test_p"] == 1.0


def test_coupling_counts_identical_steps_and_first_divergence():
    runs = [dict(same_completions=[True, True, True]), dict(same_completions=[True, False, True]),
            dict(same_completions=[False, False, False])]
    assert lm_reward_per_step.coupling(runs) == dict(
        coupled_steps=9, coupled_steps_identical=5, coupled_seeds_identical_throughout=1,
        coupled_first_differing_step=[None, 1, 0])
