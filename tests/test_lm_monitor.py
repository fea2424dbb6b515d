"""The learning-signal monitor: a run whose groups all score alike for ``--collapse-steps`` steps is
reported (console, ``summary.json``'s warnings, ``health/*`` metrics) as collapsed -- or as solved
when every sample reaches ``--pass-threshold`` -- and ``--stop-on-collapse`` ends it early with the
final evaluation."""

from __future__ import annotations

import json

import pytest
from lm_fixtures import make_trainer, prompt_dataset, read_jsonl, varied_reward

from pg_lm.lm import monitor
from pg_lm.lm.checkpoint import TrainState

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def half_credit(prompts, completions, **_):
    """A near miss worth partial credit, every time: the policy has nothing to tell apart."""
    return [0.5] * len(completions)


def full_credit(prompts, completions, **_):
    return [1.0] * len(completions)


def test_no_signal_reads_the_group_spread_the_fillers_and_the_trained_rows():
    assert monitor.no_signal({"reward/zero_spread_frac": 1.0})
    assert monitor.no_signal({"reward/zero_spread_frac": 0.96})
    assert not monitor.no_signal({"reward/zero_spread_frac": 0.75})
    # dynamic sampling found informative groups for the batch: there is a signal
    assert not monitor.no_signal({"reward/zero_spread_frac": 1.0, "sampling/filler_frac": 0.0})
    assert monitor.no_signal({"reward/zero_spread_frac": 1.0, "sampling/filler_frac": 1.0})
    # one sample per prompt: no groups, so whether any row trained
    assert monitor.no_signal({"perf/trained_frac": 0.0}) and not monitor.no_signal({"perf/trained_frac": 0.5})


def test_watch_counts_steps_in_a_row_and_gives_one_verdict():
    st = TrainState(kl_coef=0.0)
    flat = {"reward/zero_spread_frac": 1.0, "reward/solved_frac": 0.0, "reward/mean": 0.5}
    alive = {"reward/zero_spread_frac": 0.5, "reward/solved_frac": 0.0, "reward/mean": 0.5}
    verdicts = [monitor.watch(st, dict(s), 3) for s in (flat, flat, alive, flat, flat, flat, flat)]
    assert verdicts == [None, None, None, None, None, "collapsed", None]  # once, at the 3rd step in a row
    assert st.no_signal_steps == 4
    stats = dict(flat)
    monitor.watch(st, stats, 3)
    assert stats["health/no_signal_steps"] == 5 and stats["health/collapsed"] == 1.0
    solved = {**flat, "reward/solved_frac": 1.0, "reward/mean": 1.0}
    st = TrainState(kl_coef=0.0)
    assert [monitor.watch(st, dict(solved), 2) for _ in range(3)] == [None, "solved", None]
    st = TrainState(kl_coef=0.0)
    assert [monitor.watch(st, dict(flat), 0) for _ in range(30)] == [None] * 30  # 0: never


def test_a_constant_partial_reward_is_reported_as_collapsed(tiny_lm_dir, tmp_path, capsys):
    summary = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[half_credit], max_steps=5, collapse_steps=3,
                           eval_dataset=prompt_dataset(["q", "xy"])).train()
    out = capsys.readouterr().out
    (warning,) = [w for w in summary["warnings"] if "no learning signal" in w]
    assert "step 3: no learning signal for the last 3 steps" in warning and "stuck at mean reward 0.500" in warning
    assert "--dynamic-sampling" in warning and "--clip-high 0.28" in warning and warning in out
    assert summary["learning"] == "collapsed" and summary["train/steps"] == 5
    assert json.loads((tmp_path / "summary.json").read_text())["warnings"] == summary["warnings"]
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "health/no_signal_steps" in r]
    assert [r["health/no_signal_steps"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["health/collapsed"] for r in rows] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(r["completion/distinct_frac"] <= 1.0 for r in rows)


def test_stop_on_collapse_ends_the_run_with_its_final_evaluation(tiny_lm_dir, tmp_path):
    summary = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[half_credit], max_steps=20, collapse_steps=2,
                           stop_on_collapse=True, eval_dataset=prompt_dataset(["q", "xy"])).train()
    assert summary["train/steps"] == 2 and summary["learning"] == "collapsed"
    assert "eval/reward_after" in summary and (tmp_path / "checkpoint-last").exists()


def test_a_task_nothing_scores_on_says_so():
    stats = {"reward/mean": 0.0, "reward/std": 0.0, "completion/distinct_frac": 1.0}
    line = monitor.message("collapsed", stats, 20, 20)
    assert line.startswith("warning: step 20: no learning signal for the last 20 steps -- no sample earned any reward")
    assert "distinct completions per group 1.000" in line and "denser reward" in line
    assert "stuck at mean reward" in monitor.message("collapsed", {**stats, "reward/mean": 0.5}, 20, 20)


def test_a_solved_task_is_reported_as_solved_not_collapsed(tiny_lm_dir, tmp_path):
    summary = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[full_credit], max_steps=3, collapse_steps=2,
                           stop_on_collapse=True).train()
    assert summary["learning"] == "solved" and summary["train/steps"] == 3  # solved does not stop the run
    assert not any("no learning signal" in w for w in summary.get("warnings", []))


def test_a_varied_reward_gives_no_verdict(tiny_lm_dir, tmp_path):
    summary = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[varied_reward], max_steps=4, collapse_steps=2).train()
    assert "learning" not in summary
