"""benchmarks/robust_defaults.py: every candidate setting is a valid ``pg-lm lm`` command, and the
table's cells and summary are the medians, minima, quantiles and collapse counts of the runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robust_defaults as rd  # noqa: E402

from pg_lm.lm.config import LMConfig  # noqa: E402
from pg_lm.run.config import parse_config  # noqa: E402
from pg_lm.tasks import TASKS  # noqa: E402


@pytest.mark.parametrize("setting", list(rd.SETTINGS))
def test_every_setting_parses_into_the_flags_it_names(setting, tmp_path):
    argv = rd.command("rounding", setting, 1, 60, 50, tmp_path)[4:]  # after "python -m pg_lm.cli lm"
    cfg = parse_config(LMConfig, argv)
    assert cfg.task == "rounding" and cfg.seed == 1 and cfg.max_steps == 60 and cfg.eval_size == 50
    base = parse_config(LMConfig, argv[: argv.index("--progress") + 2])
    changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(base, k) and not k.startswith("_")}
    assert bool(changed) == (setting != "defaults"), changed


def test_the_tasks_are_the_built_in_ones():
    assert set(rd.TASKS) == set(TASKS) and len(rd.TASKS) >= 6


def test_the_table_summarises_gains_and_collapses():
    rows = [{"task": "rounding", "setting": "defaults", "seed": k, "gain": g, "learning": lrn}
            for k, (g, lrn) in enumerate([(0.3, "learning"), (-0.1, "collapsed"), (0.2, "learning")])]
    rows += [{"task": "sorting", "setting": "defaults", "seed": 0, "gain": 0.5, "learning": "solved"},
             {"task": "rounding", "setting": "entropy", "seed": 0, "gain": 0.1, "learning": "learning"},
             {"task": "rounding", "setting": "entropy", "seed": 1, "error": "boom"}]
    table = rd.render(rows)
    assert "| rounding | +0.20 / -0.10 / 1of3 | +0.10 / +0.10 / 0of1 |" in table
    assert "| sorting | +0.50 / +0.50 / 0of1 |  |" in table
    # defaults' per-task worst: rounding -0.1, sorting 0.5 -> mean 0.2
    assert "| defaults | 4 | -0.100 | -0.100 | +0.200 | +0.250 | 1 |" in table
    assert "| entropy | 1 | +0.100 | +0.100 | +0.100 | +0.100 | 0 |" in table
    assert "chosen by the rule (settings with every run done): defaults" in table  # entropy lacks runs
    assert rd.quantile([5, 1, 3, 2, 4], 0.1) == 1 and rd.quantile([5, 1, 3, 2, 4], 0.5) == 3


def test_the_rule_takes_the_best_worst_case_then_the_per_task_worst_then_fewer_collapses():
    def runs(setting, gains, collapsed=()):
        return [{"task": t, "setting": setting, "seed": k, "gain": g,
                 "learning": "collapsed" if (t, k) in collapsed else "learning"}
                for (t, k), g in zip([("a", 0), ("a", 1), ("b", 0), ("b", 1)], gains)]

    best_mean = runs("defaults", [0.9, 0.9, 0.0, 0.0])  # the best mean, and a task it never learns
    steady = runs("entropy", [0.3, 0.2, 0.1, 0.1])  # lower mean, better worst case
    assert rd.choose(best_mean + steady) == "entropy"
    # a task every setting fails (worst 0 for both): the per-task worst decides
    tie = runs("lower-lr", [0.95, 0.92, 0.0, 0.0])
    assert rd.choose(best_mean + tie) == "lower-lr"
    # equal on both: fewer collapsed runs
    calm = runs("dr-grpo", [0.9, 0.9, 0.0, 0.0])
    assert rd.choose(runs("defaults", [0.9, 0.9, 0.0, 0.0], {("b", 0), ("b", 1)}) + calm) == "dr-grpo"
    # a setting missing a run cannot be chosen
    assert rd.choose(best_mean + steady[:3]) == "defaults"
