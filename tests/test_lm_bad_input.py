"""Bad input is a one-line error that names it, raised before the first step (the CLI prints
it and exits 2): prompts over the limit (or dropped / truncated as asked), empty datasets, a
column a reward function needs, a reward function that hangs. Rewards as NumPy scalars, 0-d
tensors or bools are read one documented way."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, varied_reward
from pg_lm.lm import RewardError
from pg_lm.lm.rewards import call_reward, needed_columns

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

LONG = ["x" * 40, "ab", "y" * 30, "cd"]  # with the chat template "Q:...\nA:": 45, 7, 35, 7 tokens


def test_long_prompts_are_all_found_before_the_first_step(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^2 of 4 training prompts are longer than --max-prompt-length 16 tokens "
                                         r"\(the longest, row 0, has 45\).*--long-prompts truncate-left or drop$"):
        make_trainer(tiny_lm_dir, tmp_path, train_dataset=prompt_dataset(LONG), max_prompt_length=16)


def test_long_prompts_dropped(tiny_lm_dir, tmp_path, capsys):
    tr = make_trainer(tiny_lm_dir, tmp_path, train_dataset=prompt_dataset(LONG), max_prompt_length=16,
                      long_prompts="drop", eval_dataset=prompt_dataset(["ab", "z" * 20]))
    assert tr.train_ds["prompt"] == ["ab", "cd"] and tr.eval_ds["prompt"] == ["ab"]
    assert "2 of 4 training prompts" in capsys.readouterr().out
    tr.train_step()
    with pytest.raises(ValueError, match="would leave none"):
        make_trainer(tiny_lm_dir, tmp_path, train_dataset=prompt_dataset(["x" * 40]), max_prompt_length=16,
                     long_prompts="drop")


def test_long_prompts_truncated_on_the_left(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, train_dataset=prompt_dataset(LONG), max_prompt_length=16,
                      long_prompts="truncate-left")
    batch, _ = tr.rollout()
    assert batch.prompt_ids.shape[1] == 16 and int(batch.prompt_mask.sum(1).max()) == 16
    tail = tr.tok.decode(batch.prompt_ids[batch.prompt_mask.sum(1).argmax()])
    assert tail.endswith("\nA:")  # the end of the prompt (the chat template's turn) is what is kept


@pytest.mark.parametrize("which", ["training", "evaluation"])
def test_an_empty_dataset_is_named(tiny_lm_dir, tmp_path, which):
    empty = prompt_dataset([])
    kw = {"train_dataset": empty} if which == "training" else {"eval_dataset": empty}
    with pytest.raises(ValueError, match=f"^the {which} dataset is empty$"):
        make_trainer(tiny_lm_dir, tmp_path, **kw)


def needs_answer(prompts, completions, answer, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


@pytest.mark.parametrize("which", ["training", "evaluation"])
def test_a_column_a_reward_function_needs_is_checked_before_training(tiny_lm_dir, tmp_path, which):
    with_answer = prompt_dataset(["ab", "cd"], answer=["1", "2"])
    without = prompt_dataset(["ab", "cd"], question=["q", "r"])
    train, evals = (without, with_answer) if which == "training" else (with_answer, without)
    with pytest.raises(ValueError, match=f"reward function 'needs_answer' needs the column 'answer', which the "
                                         f"{which} dataset does not have \\(it has: prompt, question\\)"):
        make_trainer(tiny_lm_dir, tmp_path, reward_fns=[needs_answer], train_dataset=train, eval_dataset=evals)


def test_needed_columns_reads_the_signature():
    from pg_lm.tasks import exact_match

    assert needed_columns(exact_match) == ["answer"]
    assert needed_columns(varied_reward) == []
    assert needed_columns(lambda p, c, answer, unit="cm", **kw: p) == ["answer"]
    assert needed_columns(lambda prompts, completions, *, answer: prompts) == ["answer"]


def test_a_reward_function_that_hangs_is_stopped_by_the_timeout():
    def slow_reward(prompts, completions, **_):
        time.sleep(30)

    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"^reward function 'slow_reward' did not return within 0.2 s \(--reward-timeout\)$"):
        call_reward(slow_reward, ["p"], ["c"], {}, [1], timeout=0.2)
    assert time.perf_counter() - t0 < 5
    # within the limit the result (and an error raised inside) come back as without one
    assert call_reward(varied_reward, ["p"], ["c"], {}, [1], timeout=5).shape == (1, 1)
    with pytest.raises(RewardError, match="raised KeyError"):
        call_reward(lambda p, c, **_: {}["k"], ["p"], ["c"], {}, [1], timeout=5)


def test_the_timeout_reaches_the_trainer(tiny_lm_dir, tmp_path):
    def stuck(prompts, completions, **_):
        time.sleep(30)

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[stuck], reward_timeout=0.5)
    with pytest.raises(RewardError, match="'stuck' did not return within 0.5 s"):
        tr.train_step()


def test_numpy_scalars_tensors_and_bools_are_numbers():
    out = [np.float32(0.5), np.int64(2), torch.tensor(1.5), True, np.bool_(False)]
    dense = call_reward(lambda p, c, **_: out, ["p"] * 5, ["c"] * 5, {}, [1] * 5)
    assert dense[:, 0].tolist() == [0.5, 2.0, 1.5, 1.0, 0.0]
    per_token = call_reward(lambda p, c, **_: [np.array([0.0, 1.0]), [True, False]], ["p"] * 2, ["c"] * 2, {}, [2, 2])
    assert per_token.tolist() == [[0.0, 1.0], [1.0, 0.0]]
