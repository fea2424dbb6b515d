"""The built-in tasks: generated offline from a seed, their rewards score hand-written right and wrong
answers as documented, the embedded model's untrained reward on each is low, and each trains from
the command line (the dense one through ``completion_ids``)."""

from __future__ import annotations

import json

import pytest
import torch

from lm_fixtures import make_tokenizer, read_jsonl
from pg_lm.cli import main
from pg_lm.lm.config import TASK_NAMES
from pg_lm.tasks import TASKS, count_progress, countdown_reward, rounding_reward, sorting_reward, tagged_answer

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def test_task_names_are_the_flag_choices(capsys):
    assert TASK_NAMES == tuple(TASKS)
    with pytest.raises(SystemExit):
        main(["lm", "--help"])
    assert "{arithmetic,countdown,tagged,counting,rounding,sorting}" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(TASKS))
def test_a_task_is_a_seeded_split_of_distinct_prompts(name):
    train, held_out, fns = TASKS[name](num_eval=7, seed=3)
    again, held_again, _ = TASKS[name](num_eval=7, seed=3)
    _, other, _ = TASKS[name](num_eval=7, seed=4)
    assert len(held_out) == 7 and len(train) > 100 and fns
    assert list(held_out["prompt"]) == list(held_again["prompt"]) and list(train["prompt"][:20]) == list(again["prompt"][:20])
    assert list(held_out["prompt"]) != list(other["prompt"])
    assert not set(held_out["prompt"]) & set(train["prompt"])  # held out means unseen


def test_rounding_reward_gives_the_near_miss_half():
    _, held_out, _ = TASKS["rounding"](num_eval=5)
    rows = held_out.to_list()
    assert rounding_reward(["p"] * 5, [r["answer"] for r in rows], [r["answer"] for r in rows],
                           [r["number"] for r in rows]) == [1.0] * 5
    cases = [("400", 1.0), ("It rounds to 400.", 1.0), ("350", 0.5), ("360", 0.0), ("355", 0.0), ("", 0.0),
             ("350, so 400", 1.0)]  # the last number counts
    got = rounding_reward(["p"] * len(cases), [c for c, _ in cases], ["400"] * len(cases), [352] * len(cases))
    assert got == [r for _, r in cases]
    assert rounding_reward(["p"], ["300"], ["300"], [349]) == [1.0] and rounding_reward(["p"], ["400"], ["400"], [350]) == [1.0]


def test_sorting_reward_is_the_list_or_credit_per_place():
    _, held_out, _ = TASKS["sorting"](num_eval=5)
    rows = held_out.to_list()
    assert sorting_reward(["p"] * 5, [r["answer"] for r in rows], [r["answer"] for r in rows]) == [1.0] * 5
    cases = [("7, 19, 42", 1.0), ("7,19,42 done", 1.0), ("7, 42, 19", 0.3), ("19, 7, 42", 0.3), ("42, 19, 7", 0.3),
             ("7, 19", 0.6), ("1, 2, 3", 0.0), ("", 0.0), ("7, 19, 42, 50", 1.0)]
    got = sorting_reward(["p"] * len(cases), [c for c, _ in cases], ["7, 19, 42"] * len(cases))
    assert got == pytest.approx([r for _, r in cases])


def test_countdown_reward_checks_the_expression():
    train, held_out, _ = TASKS["countdown"](num_eval=20)
    rows = held_out.to_list()
    right = countdown_reward([r["prompt"] for r in rows], [f"<answer>{r['solution']}</answer>" for r in rows],
                             [r["numbers"] for r in rows], [r["target"] for r in rows])
    assert right == [1.0] * 20  # every generated puzzle has the solution it was built from
    cases = [("<answer>(12 - 7) * 3</answer>", 1.0), ("3 * (12 - 7)", 1.0), ("(12 - 7) × 3 = 15", 1.0),
             ("12 - 7 + 3", 0.1),  # the right numbers, another value
             ("12 * 7 - 3 * 3", 0.0),  # a number used twice
             ("12 + 3", 0.0),  # one left out
             ("15", 0.0), ("__import__('os')", 0.0), ("12 / (7 - 7) + 3", 0.0), ("", 0.0)]
    got = countdown_reward(["p"] * len(cases), [c for c, _ in cases], [[3, 7, 12]] * len(cases), [15] * len(cases))
    assert got == [r for _, r in cases]


def test_tagged_reward_wants_the_right_answer_inside_the_tag():
    cases = [("<answer>52</answer>", 1.0), ("The larger is <answer> 52 </answer>.", 1.0), ("<answer>37</answer>", 0.2),
             ("52", 0.0), ("<answer>52</answer> <answer>52</answer>", 0.0), ("<answer></answer>", 0.0)]
    assert tagged_answer(["p"] * len(cases), [c for c, _ in cases], ["52"] * len(cases)) == [r for _, r in cases]


def test_counting_reward_is_per_token_and_sums_to_the_right_prefix():
    tok = make_tokenizer()  # one token per character
    ids = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731
    texts = ["18 19 20 21 22", " 18 19 2", "18 20 21", "91"]
    out = count_progress(["p"] * 4, texts, [ids(t) for t in texts], tok, ["18 19 20 21 22"] * 4)
    assert [len(o) for o in out] == [len(t) for t in texts]  # one value per token
    n = len("18 19 20 21 22")
    assert sum(out[0]) == pytest.approx(1.0) and out[0] == pytest.approx([1 / n] * n)
    assert sum(out[1]) == pytest.approx(len("18 19 2") / n) and out[1][0] == 0.0  # a leading space earns nothing
    assert out[2] == pytest.approx([1 / n] * 3 + [0.0] * 5)  # "18 " then "2" breaks the count: nothing after
    assert out[3] == [0.0, 0.0]


@pytest.mark.parametrize("task", ["counting", "countdown"])
def test_a_task_trains_from_the_command_line(task, tiny_lm_dir, tmp_path):
    out = tmp_path / task
    code = main(["lm", "--task", task, "--model", tiny_lm_dir, "--output-dir", str(out), "--max-steps", "1",
                 "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--eval-size", "2",
                 "--progress", "false", "--save-model", "false", "--mixed-precision", "no", "--max-prompt-length", "256"])
    assert code == 0
    row = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r][-1]
    name = TASKS[task](num_eval=1)[2][0].__name__
    assert f"reward/{name}" in row and torch.isfinite(torch.tensor(row["reward/mean"]))
    assert "eval/reward_after" in json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def embedded():
    """The embedded SmolLM2-135M-Instruct (skipped where it is not installed or cached)."""
    from pg_lm.lm.export import load_trained
    from pg_lm.lm.models import DEFAULT_MODEL, resolve_model

    try:
        resolve_model(DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_trained(DEFAULT_MODEL, None)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_untrained_embedded_model_scores_low(name, embedded):
    """Room to learn: greedy on 6 held-out prompts, the untrained model's mean reward is under 0.3
    (measured: 0.0 arithmetic, 0.006 countdown, 0.0 tagged, 0.026 counting, on 16 prompts)."""
    from pg_lm.lm.config import EvalConfig
    from pg_lm.lm.evaluate import evaluate_prompts
    from pg_lm.lm.rewards import RewardSet

    lm, tok = embedded
    _, held_out, fns = TASKS[name](num_eval=6)
    cfg = EvalConfig(model="embedded", task=name, eval_batch_size=6)
    out = evaluate_prompts(lm, tok, RewardSet(fns), held_out, cfg, 16)
    assert out["eval/reward"] < 0.3 and out["eval/accuracy"] < 0.5
