"""A tiny random model learns a toy reward in a few seconds.

The reward is the fraction of digits in a 4-character completion: about 0.1 for the
random model (10 of ~100 tokens), 1.0 when it writes only digits. The reward is dense
enough that every step has a signal, so 20 steps of RLOO move it far from chance.
"""

from __future__ import annotations

import pytest

from lm_fixtures import learns_digits

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


@pytest.mark.parametrize("estimator, extra", [("reinforce", {"baseline": "loo"}),
                                              ("reinforce", {"baseline": "group_mean", "scale_rewards": True})],
                         ids=["rloo", "grpo"])
def test_tiny_model_learns_to_write_digits(tiny_lm_dir, tmp_path, estimator, extra):
    learns_digits(tiny_lm_dir, tmp_path, estimator=estimator, **extra)
