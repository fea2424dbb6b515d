"""benchmarks/pg_table.py: its rows are the runs they name, and its table is made from what was measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pg_table = pytest.importorskip("pg_table")


def test_median_counts_a_seed_that_never_reached_as_infinitely_slow():
    assert pg_table.median_or_none([3.0, None, 1.0]) == 3.0
    assert pg_table.median_or_none([3.0, None, None]) is None  # most seeds never got there
    assert pg_table.median_or_none([4.0, 1.0, None, 2.0]) == 3.0


@pytest.mark.parametrize("row", list(pg_table.LM_ROWS))
def test_each_lm_row_trains_with_its_estimators_flags(row):
    """The flags a row's run is given parse into the trainer settings that pg-lm variance measures under its name."""
    from pg_lm.lm.config import LMConfig
    from pg_lm.lm.variance import ESTIMATORS
    from pg_lm.run import parse_config

    cfg = parse_config(LMConfig, ["--task", "arithmetic", *pg_table.lm_flags(row)])
    e = ESTIMATORS[row]
    assert (cfg.estimator, cfg.baseline, cfg.scale_rewards) == (e.estimator, e.baseline, e.scale_rewards)


@pytest.mark.parametrize("row", list(pg_table.GYM_ROWS))
def test_each_gym_row_is_a_valid_config_of_its_method(row):
    from pg_lm.gym import GymConfig, resolve

    fields = pg_table.GYM_ROWS[row][2]
    cfg = resolve(GymConfig(env="CartPole-v1", **fields))
    assert all(getattr(cfg, k) == v for k, v in fields.items())


def _variance(rows: dict[str, tuple[float, float]]) -> dict:
    return {"results": {r: dict(variance=v, snr_debiased=s, mean_norm=1.0) for r, (v, s) in rows.items()}}


def test_table_from_the_measured_json(tmp_path):
    seeds = [0, 1, 2]
    evals = [[(1000, 0.1, 20.0), (2000, 0.2, 480.0)], [(1000, 0.1, 300.0)], [(1000, 0.1, 475.0)]]
    gym_rows = {"reinforce": dict(per_seed_steps=[30_000, None, 50_000], per_seed_time_s=[3.0, None, 5.0],
                                  reached="2/3", budget_steps=300_000, runs=[dict(evals=e) for e in evals]),
                "ppo": dict(per_seed_steps=[None, None, 20_000], per_seed_time_s=[None, None, 2.0],
                            reached="1/3", budget_steps=100_000)}
    var = _variance({"reinforce": (2.0, 0.5), "ppo": (0.01, 1.25)})
    gym = dict(seeds=seeds, var_batches=64, envs={"CartPole-v1": dict(target=475.0, rows=gym_rows, variance=dict(
        reference_run=dict(points=dict(initial=0, mid=5120, solved=None)),
        points=dict(initial=var, mid=var, solved=None)))})
    (tmp_path / "gym.json").write_text(json.dumps(gym))
    lm = dict(seconds=300, seed=0, var_batches=32, rows={
        "none": dict(accuracy_before=0.01, accuracy_after=0.4, steps=90, truncated_after=0.25),
        "remax": dict(accuracy_before=0.01, accuracy_after=0.7, steps=60)},
        variance=dict(initial=dict(main=_variance({"none": (0.1, 0.3)}),
                                   remax=_variance({"remax": (0.05, 0.6), "none": (9.0, 9.0)}))))
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    text = pg_table.render(tmp_path)
    assert text == (tmp_path / "table.md").read_text()
    lines = text.splitlines()
    reinforce = next(line for line in lines if "(`reinforce`)" in line)
    # median steps over 3 seeds with one unreached = the larger of the two reached; no solved point was saved
    # best evaluations 480, 300, 475: median 475
    assert "| 2/3 of 300k | 50,000 | 5.0 | 475 | 0.50 / 0.50 / — | 2 / 2 / — |" in reinforce
    ppo = next(line for line in lines if "(`ppo`)" in line)
    assert "| 1/3 of 100k | — | — | — | 1.25 / 1.25 / — |" in ppo  # most seeds never reached: no median
    none = next(line for line in lines if "(`none`)" in line)
    # none's variance is the main measurement's, not the anchor measured beside ReMax; no trained point
    assert "0.01 -> **0.40** (90) | 25% | 0.30 / — | 0.1 / — |" in none
    assert "0.01 -> **0.70** (60) | — | 0.60 / — | 0.05 / — |" in next(line for line in lines if "(`remax`)" in line)
    assert "a PPO run's policy at 5120 and — env steps" in text
    summary = pg_table.render_summary(tmp_path).splitlines()
    assert summary == (tmp_path / "table_summary.md").read_text().splitlines()
    assert summary[0].startswith("| method | baseline | CartPole-v1: env steps to 475 (seconds) |")
    assert "| REINFORCE | none (raw returns) | 50,000 (5.0 s) | 0.50 / 0.50 / — |" in summary
    assert "| PPO | V(s), GAE, clipped ratio | 1/3 seeds within 100k | 1.25 / 1.25 / — |" in summary
    assert "| ReMax | greedy completion's reward | 0.01 -> **0.70** (60) | 0.60 / — | 0.05 / — |" in summary


@pytest.mark.parametrize("row", list(pg_table.TURN_ROWS))
def test_each_turn_row_trains_with_its_credit_modes_flags(row):
    """A multi-turn row's recipe flags give the trainer settings pg-lm variance measures under its name."""
    from pg_lm.lm.config import LMConfig
    from pg_lm.lm.variance import ESTIMATORS
    from pg_lm.run import parse_config

    cfg = parse_config(LMConfig, ["--env", "guess", *pg_table.TURN_ROWS[row][2]])
    e = ESTIMATORS[row]
    assert (cfg.credit, cfg.turn_baseline, cfg.baseline) == (e.credit, e.turn_baseline, e.baseline)
    variance = parse_config(LMConfig, sys.modules["pg_table_turns"].VARIANCE_FLAGS)  # measured at the rows' discount
    assert cfg.turn_gamma == (variance.turn_gamma if row != "episode" else 1.0)


def test_turns_table_from_the_measured_json(tmp_path):
    runs = lambda *after: [dict(seed=k, success_before=0.0, success_after=a, return_after=a, steps=40)
                           for k, a in enumerate(after)]
    turns = dict(steps=40, seeds=[0, 1, 2], var_batches=16,
                 rows={"episode": runs(0.1, 0.3, 0.2), "turn": runs(0.5, 0.0, 0.4)},
                 variance=dict(initial=_variance({"episode": (2.0, 0.25), "turn": (1.0, 0.5)})))
    (tmp_path / "turns.json").write_text(json.dumps(turns))
    lines = pg_table.render(tmp_path).splitlines()
    assert "| 0.00 -> **0.20** (0.10, 0.30, 0.20) | 0.20 | 0.25 / — | 2 / — |" in next(
        line for line in lines if "(`episode`)" in line)
    assert "| 0.00 -> **0.40** (0.50, 0.00, 0.40) | 0.40 | 0.50 / — | 1 / — |" in next(
        line for line in lines if "(`turn`)" in line)
