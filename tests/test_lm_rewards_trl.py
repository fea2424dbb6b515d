"""Reward functions written for TRL's ``GRPOTrainer`` run unchanged: called by keyword
(``completions``, ``completion_ids``, dataset columns, ``trainer_state``), chat completions that
read as TRL's one-message lists, None as "not applicable", TRL's own ``trl.rewards`` helpers, and
the same functions from a file on the command line. pg_lm's positional form keeps working."""

from __future__ import annotations

import json
import pickle
import re
import warnings

import pytest
import torch
from lm_fixtures import make_trainer, prompt_dataset, read_jsonl

from pg_lm.cli import main
from pg_lm.lm import RewardError, RewardSet
from pg_lm.lm.reward_calling import (
    Completion,
    as_completions,
    by_keyword,
    needed_columns,
)
from pg_lm.lm.reward_specs import load_reward
from pg_lm.lm.rewards import RewardWarning, call_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

PROMPTS = ["Tell me about cats.", "Tell me about dogs.", "Tell me about fish."]
CHAT = [[{"role": "user", "content": p}] for p in PROMPTS]
TEXTS = ["<think>hm</think><answer>cats purr</answer>", "dogs bark", ""]
LENGTHS = [3, 2, 1]
IDS = torch.tensor([[5, 5, 5], [6, 7, 0], [2, 0, 0]])  # (B, T), right-padded


def score(fns, prompts=PROMPTS, completions=TEXTS, columns=None, **kw):
    """Each function's total per completion, and the weighted total, as lists."""
    per_fn, dense = RewardSet(fns, **kw).score(prompts, completions, columns or {}, LENGTHS, IDS)
    return {k: v.tolist() for k, v in per_fn.items()}, dense.sum(1).tolist()


# ---------------------------------------------------------------- functions shaped like TRL's examples

def reward_len(completions, **kwargs):
    """TRL's quick-start reward: completions close to 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    return [1.0 if re.match(pattern, c) else 0.0 for c in completions]


def mentions_topic(completions, topic, **kwargs):
    return [float(t in c) for c, t in zip(completions, topic)]


def accuracy(completions, solution, **kwargs):
    return [float(c.strip() == s) for c, s in zip(completions, solution)]


def longer_is_better(completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def chat_format(completions, **kwargs):
    """TRL's conversational format reward: reads each completion as a one-message list."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(r"^<think>.*?</think>", c) else 0.0 for c in contents]


def chat_correct(prompts, completions, answer, **kwargs):
    """The popular GRPO-demo shape: (prompts, completions, column, **kwargs), read as chat messages."""
    return [2.0 if completion[0]["content"].endswith(a) else 0.0 for completion, a in zip(completions, answer)]


def only_kwargs(**kwargs):
    return [float(len(c)) for c in kwargs["completions"]]


def test_trl_shaped_functions_are_called_by_keyword_and_score():
    columns = {"topic": ["cats", "cats", "fish"], "solution": ["x", "dogs bark", "y"]}
    per_fn, total = score([reward_len, format_reward, mentions_topic, accuracy, longer_is_better, only_kwargs],
                          columns=columns, weights=[1, 1, 1, 1, 1, 0])
    assert per_fn == {"reward_len": [-23.0, -11.0, -20.0], "format_reward": [1.0, 0.0, 0.0],
                      "mentions_topic": [1.0, 0.0, 0.0], "accuracy": [0.0, 1.0, 0.0],
                      "longer_is_better": [3.0, 2.0, 1.0], "only_kwargs": [43.0, 9.0, 0.0]}
    assert total == [-18.0, -8.0, -19.0]


def test_the_signature_picks_the_call():
    """pg_lm's positional form stays positional whatever its parameters are called; TRL's forms go by keyword."""
    assert [by_keyword(f) for f in (reward_len, mentions_topic, longer_is_better, only_kwargs, chat_correct)] == \
        [True, True, True, True, False]  # chat_correct: (prompts, completions, ...) is the same either way
    seen = {}

    def positional(p, c, **columns):
        seen.update(p=p, c=c, columns=columns)
        return [0.0] * len(c)

    def renamed(prompts, texts, *, topic):  # no **kwargs: gets only what it names
        return [float(t in x) for x, t in zip(texts, topic)]

    assert not by_keyword(positional) and not by_keyword(renamed)
    assert needed_columns(positional) == [] and needed_columns(renamed) == ["topic"]
    per_fn, _ = score([positional, renamed], columns={"topic": ["cats", "x", "y"], "id": [1, 2, 3]})
    assert seen == {"p": PROMPTS, "c": TEXTS, "columns": {"topic": ["cats", "x", "y"], "id": [1, 2, 3]}}
    assert per_fn["renamed"] == [1.0, 0.0, 0.0]


def test_needed_columns_of_trl_functions():
    def all_of_trl(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **kwargs):
        return [0.0] * len(completions)

    assert needed_columns(reward_len) == [] and needed_columns(only_kwargs) == []
    assert needed_columns(mentions_topic) == ["topic"] and needed_columns(accuracy) == ["solution"]
    assert needed_columns(longer_is_better) == [] and needed_columns(all_of_trl) == []
    with pytest.raises(ValueError, match="reward function 'mentions_topic' needs the column 'topic', which the "
                                         "training dataset does not have"):
        RewardSet([reward_len, mentions_topic]).check_columns(["prompt", "answer"], "training")
    RewardSet([reward_len, mentions_topic, all_of_trl]).check_columns(["prompt", "topic"], "training")


def test_trainer_state_and_log_functions_reach_only_a_function_that_names_them():
    got = {}

    def schedule(completions, trainer_state, log_metric, log_extra, **kwargs):
        got.update(state=trainer_state, kwargs=set(kwargs))
        log_metric("my/metric", 1.0)  # accepted and ignored
        log_extra("note", ["a"] * len(completions))
        step = trainer_state.global_step if trainer_state is not None else 0
        return [float(step)] * len(completions)

    def plain(completions, **kwargs):
        got["plain"] = set(kwargs)
        return [0.0] * len(completions)

    def strict(completions):  # TRL needs **kwargs; pg_lm passes only what is named
        return [0.0] * len(completions)

    rs = RewardSet([schedule, plain, strict])
    rs.score(PROMPTS, TEXTS, {"topic": [1, 2, 3]}, LENGTHS, IDS)
    assert got["state"] is None and got["kwargs"] == {"prompts", "topic"} and got["plain"] == {"prompts", "topic"}
    rs.trainer_state = type("State", (), {"global_step": 7, "max_steps": 10})()
    assert rs.score(PROMPTS, TEXTS, {}, LENGTHS)[0]["schedule"].tolist() == [7.0, 7.0, 7.0]


# ---------------------------------------------------------------- chat prompts

def test_completions_read_as_text_and_as_trl_messages():
    """pg_lm's texts and TRL's conversational one-message lists, from one value, for chat and string prompts."""
    def plain_text(prompts, completions, **columns):  # pg_lm's contract: texts
        return [float(c.strip().startswith("<think>")) for c in completions]

    answer = {"answer": ["purr</answer>", "bark", "x"]}
    for prompts in (CHAT, PROMPTS):
        per_fn, _ = score([chat_format, chat_correct, plain_text], prompts=prompts, columns=answer)
        assert per_fn == {"chat_format": [1.0, 0.0, 0.0], "chat_correct": [2.0, 2.0, 0.0],
                          "plain_text": [1.0, 0.0, 0.0]}


def test_a_completion_is_a_str_with_a_message_view():
    c, empty = as_completions(["dogs bark", ""])
    assert isinstance(c, Completion) and c == "dogs bark" and type(c.strip()) is str and hash(c) == hash("dogs bark")
    assert c[0] == "d" and c[-1] == "k" and c[1:3] == "og" and c[0].isalpha()  # still the characters
    assert c[0]["content"] == c[-1]["content"] == "dogs bark" and c[0]["role"] == "assistant"
    assert c[0].get("content") == "dogs bark" and empty[0]["content"] == "" and empty[-1]["role"] == "assistant"
    with pytest.raises(IndexError):
        empty[1]
    again = pickle.loads(pickle.dumps([c, c[0]]))  # e.g. to a process pool
    assert again == ["dogs bark", "d"] and again[1]["content"] == "dogs bark"
    assert json.dumps([c]) == '["dogs bark"]'


# ---------------------------------------------------------------- TRL's own helpers

def test_trl_reward_helpers_run_through_a_reward_set():
    rewards = pytest.importorskip("trl.rewards")
    overlong = rewards.get_soft_overlong_punishment(max_completion_len=3, soft_punish_cache=2)
    repetition = rewards.get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    per_fn, _ = score([rewards.think_format_reward, overlong, repetition], prompts=CHAT,
                          completions=["<think>a</think>b", "no think", ""])
    assert per_fn == {"think_format_reward": [1.0, 0.0, 0.0], "soft_overlong_punishment_reward": [-1.0, -0.5, 0.0],
                      "repetition_penalty_reward": [-0.5, 0.0, 0.0]}  # ids (5,5,5), (6,7), (2,)
    want = [rewards.think_format_reward([[{"content": t}]])[0] for t in ["<think>a</think>b", "no think", ""]]
    assert per_fn["think_format_reward"] == want  # what TRL itself gives on TRL-shaped input


def test_trl_accuracy_reward_with_a_dataset_column():
    rewards = pytest.importorskip("trl.rewards")
    pytest.importorskip("math_verify")
    per_fn, _ = score([rewards.accuracy_reward], prompts=CHAT, completions=[r"\boxed{\frac{1}{3}}", "2", "x"],
                      columns={"solution": [r"$\frac{1}{3}$", "$3$", "$4$"]})
    assert per_fn["accuracy_reward"][:2] == [1.0, 0.0]


# ---------------------------------------------------------------- None: not applicable

def test_none_adds_nothing_like_trls_nansum():
    def sometimes(completions, **kwargs):
        return [1.0, None, 2.0]

    def other(completions, **kwargs):
        return [None, 3.0, 4.0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every completion has a reward: no warning
        per_fn, total = score([sometimes, other], weights=[2.0, 0.5])
    trl = torch.tensor([[1.0, float("nan")], [float("nan"), 3.0], [2.0, 4.0]])  # TRL's rewards_per_func
    assert total == (trl * torch.tensor([2.0, 0.5])).nansum(dim=1).tolist() == [2.0, 1.5, 6.0]
    assert per_fn == {"sometimes": [1.0, 0.0, 2.0], "other": [0.0, 3.0, 4.0]}  # None counts 0 in its own total
    assert call_reward(sometimes, PROMPTS, TEXTS, {}, LENGTHS).tolist() == [[0, 0, 1.0], [0, 0, 0], [2.0, 0, 0]]


def test_a_completion_no_function_scores_is_0_with_a_warning():
    def never_second(completions, **kwargs):
        return [1.0, None, 1.0]

    def nor_here(completions, **kwargs):
        return [0.5, None, 0.5]

    with pytest.warns(RewardWarning, match=r"every reward function \(never_second, nor_here\) returned None"):
        _, total = score([never_second, nor_here])
    assert total == [1.5, 0.0, 1.5]


# ---------------------------------------------------------------- the checks still apply

@pytest.mark.parametrize("out, fragment", [
    ([1.0], "'bad' returned 1 values for 3 completions"),
    ([1.0, float("nan"), 0.0], "'bad' returned nan for sample 1"),
    ("boom", "'bad' raised ValueError: boom"),
])
def test_a_keyword_called_function_is_checked_and_named(out, fragment):
    def bad(completions, **kwargs):
        if out == "boom":
            raise ValueError("boom")
        return out

    with pytest.raises(RewardError, match=re.escape(fragment)):
        score([reward_len, bad])


def test_the_timeout_applies_to_keyword_called_and_async_functions():
    import asyncio

    async def judge(completions, topic, **kwargs):
        await asyncio.sleep(0)
        return [float(t in c) for c, t in zip(completions, topic)]

    async def slow_judge(completions, **kwargs):
        await asyncio.sleep(30)

    per_fn, _ = score([judge, judge], columns={"topic": ["cats", "x", "y"]}, timeout=5)
    assert per_fn == {"judge": [1.0, 0.0, 0.0], "judge_2": [1.0, 0.0, 0.0]}
    with pytest.raises(RewardError, match="'slow_judge' did not return within 0.2 s"):
        score([judge, slow_judge], columns={"topic": ["cats", "x", "y"]}, timeout=0.2)


# ---------------------------------------------------------------- from a file, in the trainer, on the command line

TRL_FILE = '''
import re

def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]

def mentions_topic(completions, topic, **kwargs):
    return [float(t in completion[0]["content"]) for completion, t in zip(completions, topic)]

def format_reward(completions, **kwargs):
    return [1.0 if re.match(r"^<think>.*?</think>", c[0]["content"]) else 0.0 for c in completions]
'''


@pytest.fixture
def trl_files(tmp_path):
    (tmp_path / "trl_rewards.py").write_text(TRL_FILE)
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "topic": w} for w in ["a", "b", "c", "d"]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_trl_functions_from_a_file_load_check_and_score(trl_files):
    fns = [load_reward(f"{trl_files}/trl_rewards.py:{n}") for n in ("reward_len", "mentions_topic", "format_reward")]
    rs = RewardSet(fns)
    rs.check_columns(["prompt", "topic"], "training")
    with pytest.raises(ValueError, match="'mentions_topic' needs the column 'topic'"):
        rs.check_columns(["prompt"], "training")
    per_fn, _ = rs.score(CHAT[:2], ["<think>a</think> cats", "dogs"], {"topic": ["cats", "cats"]}, [2, 2])
    assert {k: v.tolist() for k, v in per_fn.items()} == {
        "reward_len": [-1.0, -16.0], "mentions_topic": [1.0, 0.0], "format_reward": [1.0, 0.0]}


def test_the_trainer_scores_chat_prompts_with_trl_functions_as_trl_would(tiny_lm_dir, tmp_path):
    """One rollout: each function's score equals TRL's own function on TRL-shaped input built from
    the sampled texts and ids."""
    from trl.rewards import get_soft_overlong_punishment, think_format_reward

    overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=3)
    chat = prompt_dataset([[{"role": "user", "content": p}] for p in ["ab", "cde", "f", "gh"]], topic=list("abcd"))
    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[think_format_reward, overlong, mentions_topic],
                      train_dataset=chat)
    batch, stats = tr.rollout()
    messages = [[{"role": "assistant", "content": t}] for t in batch.completions]
    ids = [row[:n] for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist())]
    want = (torch.tensor(think_format_reward(messages)) + torch.tensor(overlong(ids))
            + torch.tensor([float(t in c) for c, t in zip(batch.completions, batch.columns["topic"])]))
    torch.testing.assert_close(batch.scores, want)
    assert float(stats["reward/soft_overlong_punishment_reward"]) == pytest.approx(sum(overlong(ids)) / len(ids))


def test_cli_trains_on_chat_prompts_with_trl_reward_functions(trl_files, tiny_lm_dir):
    out = trl_files / "run"
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(out), "--dataset", str(trl_files / "chat.jsonl"),
                 "--reward", f"{trl_files}/trl_rewards.py:reward_len", f"{trl_files}/trl_rewards.py:mentions_topic",
                 "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
                 "--progress", "false", "--save-model", "false", "--mixed-precision", "no", "--lora-r", "0"])
    assert code == 0
    row = read_jsonl(out / "metrics.jsonl")[0]
    assert -20 <= row["reward/reward_len"] <= -16 and 0 <= row["reward/mentions_topic"] <= 1
    assert row["reward/mean"] == pytest.approx(row["reward/reward_len"] + row["reward/mentions_topic"], abs=1e-5)


def test_the_trainer_passes_its_progress_as_trainer_state(tiny_lm_dir, tmp_path):
    """A function naming ``trainer_state`` reads the step under way and the step budget, as TRL's
    ``TrainerState.global_step`` / ``max_steps``."""
    seen = []

    def by_progress(completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps))
        return [0.0] * len(completions)

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[by_progress], max_steps=3,
                      dynamic_sampling=False)  # one scoring per step
    tr.train_step()
    tr.train_step()
    assert seen == [(0, 3), (1, 3)]
