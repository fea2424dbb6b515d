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
def test_every_setting_parses_into_the_former_defaults_and_one_change(setting, tmp_path):
    argv = rd.command("rounding", setting, 1, 60, 50, tmp_path)[4:]  # after "python -m pg_lm.cli lm"
    cfg = parse_config(LMConfig, argv)
    assert cfg.task == "rounding" and cfg.seed == 1 and cfg.max_steps == 60 and cfg.eval_size == 50
    plain = argv[: argv.index("--progress") + 2]
    former = parse_config(LMConfig, plain + rd.one_change())
    assert (former.num_minibatches, former.clip_low, former.clip_high, former.dynamic_sampling, former.baseline) == (
        1, None, None, False, "loo")  # RLOO, one update on policy
    changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(former, k) and not k.startswith("_")}
    assert bool(changed) == (setting != "former-defaults"), changed
    if setting == rd.CHOSEN:  # the rule's pick is LMConfig's default
        defaults = parse_config(LMConfig, plain)
        assert not {k for k in vars(cfg) if getattr(cfg, k) != getattr(defaults, k) and not k.startswith("_")}


def test_the_tasks_are_the_built_in_ones():
    assert set(rd.TASKS) == set(TASKS) and len(rd.TASKS) >= 6


def test_the_table_summarises_gains_and_collapses():
    rows = [{"task": "rounding", "setting": "former-defaults", "seed": k, "gain": g, "learning": lrn}
            for k, (g, lrn) in enumerate([(0.3, "learning"), (-0.1, "collapsed"), (0.2, "learning")])]
    rows += [{"task": "sorting", "setting": "former-defaults", "seed": 0, "gain": 0.5, "learning": "solved"},
             {"task": "rounding", "setting": "entropy", "seed": 0, "gain": 0.1, "learning": "learning"},
             {"task": "rounding", "setting": "entropy", "seed": 1, "error": "boom"}]
    table = rd.render(rows)
    assert "| rounding | +0.20 / -0.10 / 1 of 3 | +0.10 / +0.10 / 0 of 1 |" in table
    assert "| sorting | +0.50 / +0.50 / 0 of 1 |  |" in table
    # former-defaults' per-task worst: rounding -0.1, sorting 0.5 -> mean 0.2
    assert "| former-defaults | 4 | -0.100 | -0.100 | +0.200 | +0.250 | 1 | - |" in table
    assert "| entropy | 1 | +0.100 | +0.100 | +0.100 | +0.100 | 0 | - |" in table
    assert "chosen by the rule (settings with every run done): former-defaults" in table  # entropy lacks runs
    assert rd.quantile([5, 1, 3, 2, 4], 0.1) == 1 and rd.quantile([5, 1, 3, 2, 4], 0.5) == 3


def test_the_rule_takes_the_best_worst_case_then_the_per_task_worst_then_fewer_collapses():
    def runs(setting, gains, collapsed=()):
        return [{"task": t, "setting": setting, "seed": k, "gain": g,
                 "learning": "collapsed" if (t, k) in collapsed else "learning"}
                for (t, k), g in zip([("a", 0), ("a", 1), ("b", 0), ("b", 1)], gains)]

    best_mean = runs("former-defaults", [0.9, 0.9, 0.0, 0.0])  # the best mean, and a task it never learns
    steady = runs("entropy", [0.3, 0.2, 0.1, 0.1])  # lower mean, better worst case
    assert rd.choose(best_mean + steady) == "entropy"
    # a task every setting fails (worst 0 for both): the per-task worst decides
    tie = runs("lower-lr", [0.95, 0.92, 0.0, 0.0])
    assert rd.choose(best_mean + tie) == "lower-lr"
    # equal on both: fewer collapsed runs
    calm = runs("dr-grpo", [0.9, 0.9, 0.0, 0.0])
    assert rd.choose(runs("former-defaults", [0.9, 0.9, 0.0, 0.0], {("b", 0), ("b", 1)}) + calm) == "dr-grpo"
    # a setting missing a run cannot be chosen
    assert rd.choose(best_mean + steady[:3]) == "former-defaults"


def test_the_summary_gives_the_median_step_time_of_the_runs():
    rows = [{"task": "rounding", "setting": "clip-higher", "seed": k, "gain": 0.1, "learning": "learning", "step_s": s}
            for k, s in enumerate([1.0, 3.0, 2.5])]
    assert "| clip-higher | 3 | +0.100 | +0.100 | +0.100 | +0.100 | 0 | 2.50 |" in rd.render(rows)


def test_the_published_runs_give_the_published_table_and_the_rule_picks_lmconfigs_default():
    import json

    root = Path(__file__).resolve().parents[1]
    rows = [json.loads(line) for line in (root / "benchmarks/results/robust_defaults/runs.jsonl").read_text().splitlines()]
    assert len(rows) == len(rd.TASKS) * len(rd.SETTINGS) * 3 and rd.choose(rows) == rd.CHOSEN
    published = (root / "BENCHMARKS.md").read_text()
    missing = [line for line in rd.render(rows).splitlines() if line.startswith("|") and line not in published]
    assert not missing, missing
