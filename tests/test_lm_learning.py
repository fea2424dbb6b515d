"""Tier (d): a tiny random model learns a toy reward in a few seconds.

The reward is the fraction of digits in a 4-character completion: about 0.1 for the
random model (10 of ~100 tokens), 1.0 when it writes only digits. The reward is dense
enough that every step has a signal, so 20 steps of RLOO move it far from chance.
"""

from __future__ import annotations

import pytest

from lm_fixtures import digit_fraction, make_trainer, prompt_dataset, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


@pytest.mark.parametrize("estimator, extra", [("reinforce", {"baseline": "loo"}),
                                              ("reinforce", {"baseline": "group_mean", "scale_rewards": True})],
                         ids=["rloo", "grpo"])
def test_tiny_model_learns_to_write_digits(tiny_lm_dir, tmp_path, estimator, extra):
    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[digit_fraction], eval_dataset=prompt_dataset(["q", "xy", "abc", "z"]),
                      estimator=estimator, max_steps=20, prompts_per_step=4, samples_per_prompt=8, max_new_tokens=4,
                      eval_max_new_tokens=4, lr=1e-2, samples_every=10, seed=1, **extra)
    summary = tr.train()
    rewards = [r["reward/mean"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3  # near chance at the start ...
    assert last > first + 0.3, rewards  # ... clearly better at the end
    assert summary["eval/reward_after"] > summary["eval/reward_before"]
