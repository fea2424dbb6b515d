"""Rewards from the command line (``--reward file.py:fn`` / ``module:fn`` / built-ins, ``--reward-weights``,
``--reward-model``) and the reward contract's newer parts: async functions (awaited together, under
the timeout) and the injected ``completion_ids`` / ``tokenizer``."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from lm_fixtures import make_trainer, read_jsonl
from pg_lm.cli import main
from pg_lm.lm import RewardError, RewardSet
from pg_lm.lm.reward_specs import load_reward
from pg_lm.lm.rewards import call_reward, needed_columns

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

REWARD_FILE = '''
def correct(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def _helper():
    pass

def shorter(prompts, completions, **_):
    return [-len(c) / 10 for c in completions]
'''
TINY = ["--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4",
        "--eval-size", "2", "--progress", "false", "--save-model", "false", "--mixed-precision", "no", "--lora-r", "0"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(1, 7)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_a_file_spec_and_a_module_spec_load_the_function(files):
    fn = load_reward(f"{files}/my_rewards.py:correct")
    assert fn(["q"] * 2, ["4", "5"], answer=["4", "4"]) == [1.0, 0.0] and needed_columns(fn) == ["answer"]
    from pg_lm.tasks.arithmetic import exact_match

    assert load_reward("pg_lm.tasks.arithmetic:exact_match") is exact_match


@pytest.mark.parametrize("spec, completions, columns, expected", [
    ("last_number", ["so 12", "12 or 13"], {"answer": ["12", "12"]}, [1.0, 0.0]),
    ("last_number=total", ["7", "8"], {"total": [7, 7]}, [1.0, 0.0]),
    ("exact", [" Paris\n", "Paris!"], {"answer": ["Paris", "Paris"]}, [1.0, 0.0]),
    ("regex=^[0-9]+$", ["42", "x42"], {}, [1.0, 0.0]),
    ("tag=answer", ["so <answer>4</answer>", "<answer>4</answer><answer>5</answer>"], {}, [1.0, 0.0]),
    ("length=4", ["abcd", "abcdefgh"], {}, [0.0, -1.0]),
])
def test_builtin_rewards_score_right_and_wrong_answers(spec, completions, columns, expected):
    assert load_reward(spec)(["q"] * 2, completions, **columns) == expected


@pytest.mark.parametrize("spec, fragment", [
    ("{d}/my_rewards.py:missing", "--reward {d}/my_rewards.py:missing: {d}/my_rewards.py has no function 'missing'; "
                                  "it has: correct, shorter"),
    ("{d}/nofile.py:f", "--reward {d}/nofile.py:f: no such file '{d}/nofile.py'"),
    ("just_a_name", "--reward just_a_name: expected path/to/file.py:function, module:function, or a built-in "
                    "(last_number, exact, regex=..., tag, length=...)"),
    ("regex", "--reward regex: the built-in 'regex' needs a value: regex=..."),
    ("length=ten", "--reward length=ten: length=N needs a whole number of characters, got 'ten'"),
    ("no_such_module_xyz:f", "--reward no_such_module_xyz:f: cannot import module 'no_such_module_xyz'"),
    ("pg_lm.tasks.arithmetic:nope", "--reward pg_lm.tasks.arithmetic:nope: module pg_lm.tasks.arithmetic has no "
                                    "function 'nope'; it has: addition_pairs, arithmetic_datasets, exact_match, last_number"),
])
def test_a_bad_reward_spec_is_one_line_exit_2_before_any_model_loads(spec, fragment, files, monkeypatch, capsys):
    import pg_lm.lm.setup as setup

    monkeypatch.setattr(setup, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["lm", "--output-dir", str(files / "run"), "--dataset", str(files / "data.jsonl"),
                 "--reward", spec.format(d=files)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert f"error: {fragment.format(d=files)}" in err, err


def test_a_reward_file_that_fails_to_import_is_named(files, capsys):
    (files / "broken.py").write_text("import no_such_package_xyz\n")
    code = main(["lm", "--dataset", str(files / "data.jsonl"), "--reward", f"{files}/broken.py:f"])
    err = capsys.readouterr().err
    assert code == 2 and f"--reward {files}/broken.py:f: importing {files}/broken.py raised ModuleNotFoundError" in err


def test_weights_whose_count_differs_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["lm", "--reward", "last_number", "--reward", "exact", "--reward-weights", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip().endswith(
        "--reward-weights has 1 values for 2 rewards (each --reward, then --reward-model)")


def test_cli_trains_with_a_reward_file_weights_and_a_reward_model(files, tiny_lm_dir, tiny_rm_dir):
    out = files / "run"
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(out), "--dataset", str(files / "data.jsonl"),
                 "--reward", f"{files}/my_rewards.py:correct", "--reward", f"{files}/my_rewards.py:shorter",
                 "--reward-model", tiny_rm_dir, "--reward-weights", "1", "0.5", "0.1", *TINY])
    assert code == 0
    row = read_jsonl(out / "metrics.jsonl")[0]
    parts = [row["reward/correct"], row["reward/shorter"], row["reward/reward_model"]]
    assert all(torch.isfinite(torch.tensor(parts))) and row["reward/shorter"] < 0
    assert row["reward/mean"] == pytest.approx(parts[0] + 0.5 * parts[1] + 0.1 * parts[2], abs=1e-5)


# ---------------------------------------------------------------- async rewards

def test_an_async_reward_is_awaited_and_its_timeout_applies():
    async def later(prompts, completions, **_):
        await asyncio.sleep(0)
        return [1.0 for _ in completions]

    assert call_reward(later, ["p"], ["c"], {}, [1]).tolist() == [[1.0]]
    assert call_reward(later, ["p"], ["c"], {}, [1], timeout=5).tolist() == [[1.0]]

    async def stuck(prompts, completions, **_):
        await asyncio.sleep(30)

    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"^reward function 'stuck' did not return within 0.2 s \(--reward-timeout\)$"):
        call_reward(stuck, ["p"], ["c"], {}, [1], timeout=0.2)
    assert time.perf_counter() - t0 < 5


def test_async_rewards_are_awaited_concurrently():
    """Each of two functions waits for the other to start: awaited one after the other, they would
    never return (the timeout would stop them); awaited together, both do."""
    async def handshake(mine, theirs):
        mine.set()
        await theirs.wait()

    a, b = {}, {}

    async def first(prompts, completions, **_):
        a.setdefault("ev", asyncio.Event()), b.setdefault("ev", asyncio.Event())
        await handshake(a["ev"], b["ev"])
        return [1.0] * len(completions)

    async def second(prompts, completions, **_):
        a.setdefault("ev", asyncio.Event()), b.setdefault("ev", asyncio.Event())
        await handshake(b["ev"], a["ev"])
        return [2.0] * len(completions)

    per_fn, dense = RewardSet([first, second], timeout=10).score(["p"], ["c"], {}, [1])
    assert per_fn["first"].tolist() == [1.0] and per_fn["second"].tolist() == [2.0] and dense.tolist() == [[3.0]]

    async def stuck(prompts, completions, **_):
        await asyncio.sleep(30)

    async def quick(prompts, completions, **_):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match="'stuck' did not return within 0.3 s"):
        RewardSet([quick, stuck], timeout=0.3).score(["p"], ["c"], {}, [1])

    async def raises(prompts, completions, **_):
        raise KeyError("k")

    with pytest.raises(RewardError, match="reward function 'raises' raised KeyError"):
        RewardSet([quick, raises]).score(["p"], ["c"], {}, [1])


# ---------------------------------------------------------------- completion_ids / tokenizer

def per_token_ids(prompts, completions, completion_ids, tokenizer):
    """A dense reward: 1 on each token that decodes to a digit, else 0."""
    return [[float(tokenizer.decode([t]).isdigit()) for t in ids] for ids in completion_ids]


def test_completion_ids_and_tokenizer_reach_a_function_that_names_them(tiny_lm_dir, tmp_path):
    from lm_fixtures import make_tokenizer

    assert needed_columns(per_token_ids) == []  # injected, not dataset columns
    tok = make_tokenizer()
    ids = torch.tensor([tok.convert_tokens_to_ids(list("a1b")), tok.convert_tokens_to_ids(list("22")) + [0]])
    per_fn, dense = RewardSet([per_token_ids]).score(["p", "p"], ["a1b", "22"], {}, [3, 2], ids, tok)
    assert dense.tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]  # the ids cut to each completion's length
    seen = {}

    def plain(prompts, completions, **columns):  # does not name them: gets the columns only
        seen.update(columns)
        return [0.0] * len(completions)

    RewardSet([plain]).score(["p"], ["c"], {"answer": ["1"]}, [1], ids[:1, :1], tok)
    assert seen == {"answer": ["1"]}
    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[per_token_ids])
    batch, stats = tr.rollout()  # the trainer passes the sampled ids: one reward per token of each completion
    digits = [[float(tr.tok.decode([t]).isdigit()) for t in row[:n]]
              for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist())]
    assert batch.scores.tolist() == pytest.approx([sum(d) for d in digits])
