"""The loss variants through the trainer and the command line: presets (--loss-type) and their bad
combinations, the sampler's log-probs and their correction, DAPO's dynamic sampling, GSPO and the
metrics of each step. The formulas themselves: tests/test_core_variants.py; global whitening over
2 processes: tests/test_lm_variants_distributed.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, read_jsonl, varied_reward
from pg_lm.cli import main
from pg_lm.lm import LMConfig
from pg_lm.lm.presets import PRESETS
from pg_lm.run.config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


# ----------------------------------------------------------------------- presets and bad input


@pytest.mark.parametrize("argv, fragment", [
    (["--loss-type", "gspo", "--ratio-level", "token"],
     "--loss-type gspo sets --ratio-level sequence; --ratio-level token contradicts it"),
    (["--loss-type", "dr_grpo", "--scale-rewards", "true"],
     "--loss-type dr_grpo sets --scale-rewards false; --scale-rewards true contradicts it"),
    (["--loss-type", "rloo", "--baseline", "group_mean"], "--loss-type rloo sets --baseline loo; --baseline group_mean"),
    (["--loss-type", "dapo", "--dynamic-sampling", "false"], "--loss-type dapo sets --dynamic-sampling true"),
    (["--ratio-level", "sequence", "--estimator", "gae"], "--ratio-level sequence (GSPO) has one advantage per completion"),
    (["--loss-type", "gspo", "--baseline", "value"], "--loss-type gspo sets --baseline group_mean; --baseline value"),
    (["--clip-ratio-c", "1"], "--clip-ratio-c must be > 1"),
    (["--dynamic-sampling", "--samples-per-prompt", "1", "--baseline", "none"],
     "--dynamic-sampling needs --samples-per-prompt >= 2"),
    (["--max-sampling-rounds", "-1"], "--max-sampling-rounds must be >= 0"),
    (["--sampler-is-cap", "0.5"], "--sampler-is-cap must be >= 1"),
])
def test_bad_combinations_exit_2_in_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lm", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_expands_to_its_flags_and_tunables_stay_overridable(name):
    p = PRESETS[name]
    cfg = LMConfig(loss_type=name)
    for k, v in {**p.defining, **p.tunable}.items():
        assert getattr(cfg, k) == v, (name, k)
    if "clip_high" in p.tunable:
        assert LMConfig(loss_type=name, clip_high=0.5).clip_high == 0.5
    # the same from flags
    flags = parse_config(LMConfig, ["--loss-type", name])
    assert flags == cfg


def test_a_given_flag_equal_to_the_default_still_contradicts():
    # --ratio-level token is pg_lm's default: only knowing it was given tells it from no flag at all
    with pytest.raises(ValueError, match="--loss-type gspo sets --ratio-level sequence; --ratio-level token"):
        LMConfig(loss_type="gspo", ratio_level="token")
    assert LMConfig(loss_type="gspo").ratio_level == "sequence"
    assert LMConfig(loss_type="gspo", ratio_level="sequence").ratio_level == "sequence"  # agreeing: fine


def test_a_preset_from_a_config_file_names_the_contradiction(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("loss_type: dr_grpo\nloss_agg: token-mean\n")
    with pytest.raises(SystemExit):
        parse_config(LMConfig, ["--config", str(f)], prog="pg-lm lm")
    assert "--loss-type dr_grpo sets --loss-agg seq-mean-token-sum-norm; --loss-agg token-mean" in capsys.readouterr().err


def test_the_cli_prints_and_saves_the_expansion(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import pg_lm.tasks

    ds = prompt_dataset()
    monkeypatch.setitem(pg_lm.tasks.TASKS, "arithmetic", lambda num_eval=100, seed=0: (ds, ds, [varied_reward]))
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-size", "2",
                 "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--progress", "false",
                 "--save-model", "false", "--loss-type", "dapo", "--clip-high", "0.3", "--mixed-precision", "no"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--loss-type dapo (Yu et al. 2025, DAPO): --estimator reinforce --baseline group_mean" in out
    assert "overridden: --clip-high 0.3" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["loss_type"] == "dapo" and config["dynamic_sampling"] is True and config["clip_high"] == 0.3
    assert config["preset"]["overridden"] == {"clip_high": 0.3} and config["preset"]["sets"]["clip_low"] == 0.2
