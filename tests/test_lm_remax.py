"""ReMax (``--baseline remax``, Li et al. 2023) through the one Trainer: one greedy completion per
prompt is decoded in the rollout's own sampling loop, scored by the same reward functions, and its
reward is the baseline of that prompt's samples; the greedy rows are never trained on."""

from __future__ import annotations

import pytest
import torch

from lm_fixtures import PROMPTS, learns_digits, make_trainer, prompt_dataset, varied_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def test_the_baseline_is_the_reward_of_the_greedy_completion(tiny_lm_dir, tmp_path):
    from pg_lm.lm.sampling import sample

    tr = make_trainer(tiny_lm_dir, tmp_path, baseline="remax", prompts_per_step=3, samples_per_prompt=4)
    batch, stats = tr.rollout()
    G = 4
    assert len(batch.completions) == batch.completion_ids.shape[0] == 3 * G  # the greedy rows are not in the batch
    assert batch.group_size == G and batch.prompts[::G] == [batch.prompts[i * G] for i in range(3)]
    # the greedy completion of each prompt, decoded on its own: the rollout's baseline is its reward
    lm, context = tr.sampling_lm()
    with context():
        greedy = sample(lm, tr.tok, batch.prompts[::G], {}, 1, tr.cfg.max_new_tokens, greedy=True,
                        max_prompt_length=tr.cfg.max_prompt_length, cpu_layer=tr.cpu_layer)
    want = torch.tensor(varied_reward(None, greedy.completions))
    torch.testing.assert_close(batch.greedy_scores, want.repeat_interleave(G))
    assert stats["reward/greedy"] == pytest.approx(float(want.mean()))
    adv, _ = tr.advantages(batch)
    mask = batch.completion_mask
    # advantage = (sampled reward - greedy reward of the prompt) on every real token
    torch.testing.assert_close(adv, (batch.scores - want.repeat_interleave(G))[:, None] * mask)
    # the sampled rows are those of a plain run: their rewards are the function's of their completions
    assert batch.scores.tolist() == pytest.approx(varied_reward(None, batch.completions))


def test_a_step_counts_only_the_sampled_tokens(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, baseline="remax", samples_per_prompt=1, lr=1e-2)  # G = 1: the paper's
    seen = []
    update = tr.update
    tr.update = lambda batch, adv, returns: (seen.append(batch), update(batch, adv, returns))[1]
    stats = tr.train_step()
    (batch,) = seen
    assert batch.completion_ids.shape[0] == tr.cfg.prompts_per_step  # one sampled row per prompt, no greedy row
    assert stats["perf/trained_frac"] == 1.0 and "reward/greedy" in stats


def fails_on_greedy(prompts, completions, **_):
    """A finite reward for the 4 samples of a prompt, NaN for the 5th completion: the greedy one."""
    return [float("nan") if i % 5 == 4 else 0.5 for i in range(len(completions))]


def test_a_reward_that_fails_on_the_greedy_completion_names_the_function(tiny_lm_dir, tmp_path):
    from pg_lm.lm import RewardError

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[fails_on_greedy], baseline="remax", samples_per_prompt=4)
    with pytest.raises(RewardError, match=r"reward function 'fails_on_greedy' returned nan for sample 4"):
        tr.train_step()


def test_remax_needs_reinforce(tiny_lm_dir, tmp_path):
    from lm_fixtures import make_config

    with pytest.raises(ValueError, match=r"--baseline remax needs --estimator reinforce"):
        make_config(tiny_lm_dir, tmp_path, baseline="remax", estimator="gae")


def test_tiny_model_learns_to_write_digits_with_remax(tiny_lm_dir, tmp_path):
    """As tests/test_lm_learning.py's RLOO and GRPO cases, with the greedy completion's reward as the baseline."""
    rows = learns_digits(tiny_lm_dir, tmp_path, baseline="remax", train_dataset=prompt_dataset(PROMPTS))
    assert sum(r["reward/greedy"] for r in rows[-5:]) / 5 > 0.5  # the baseline moved with the policy
