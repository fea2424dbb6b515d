"""One vocabulary in both backends: a field's old name (pg_lm.run.config.ALIASES) still works as a
flag, in a config file, in a saved config and in a preset table, with one notice per old name."""

from __future__ import annotations

import json

import pytest

from pg_lm.gym import GymConfig
from pg_lm.gym.variance import GymVarianceConfig
from pg_lm.lm import LMConfig
from pg_lm.run.config import ALIASES, aliases, from_dict, parse_config

GYM_OLD = ["--epochs", "3", "--minibatches", "2", "--ent-coef", "0.01", "--clip-value", "0.2", "--norm-adv", "false"]
GYM_NEW = {"ppo_epochs": 3, "num_minibatches": 2, "entropy_coef": 0.01, "value_clip": 0.2, "whiten_advantages": False}


def notices(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if "deprecated" in ln]


def test_every_alias_names_a_field_of_both_backends():
    """Each new name is a field of the LM and of the gym config, so an old name works in either."""
    for cls in (LMConfig, GymConfig):
        assert aliases(cls) == ALIASES
    assert aliases(GymVarianceConfig) == {"lam": "gae_lambda"}


def test_old_flag_sets_the_new_field_with_one_notice(capsys):
    """--lam given twice: the last value wins, as for any flag, and the notice is printed once."""
    cfg = parse_config(LMConfig, ["--lam", "0.9", "--lam", "0.8"])
    assert cfg.gae_lambda == 0.8
    assert notices(capsys) == ["--lam is deprecated: use --gae-lambda"]
    assert parse_config(LMConfig, ["--gae-lambda", "0.7"]).gae_lambda == 0.7
    assert notices(capsys) == []


def test_old_gym_flags(capsys):
    cfg = parse_config(GymConfig, GYM_OLD)
    assert {k: getattr(cfg, k) for k in GYM_NEW} == GYM_NEW
    assert notices(capsys) == ["--epochs is deprecated: use --ppo-epochs",
                               "--minibatches is deprecated: use --num-minibatches",
                               "--ent-coef is deprecated: use --entropy-coef",
                               "--clip-value is deprecated: use --value-clip",
                               "--norm-adv is deprecated: use --whiten-advantages"]


def test_the_new_flags_reach_the_gym_backend():
    """The LM backend's names set the same gym fields the old gym names did."""
    new = ["--ppo-epochs", "3", "--num-minibatches", "2", "--entropy-coef", "0.01", "--value-clip", "0.2",
           "--whiten-advantages", "false", "--gae-lambda", "0.9"]
    cfg = parse_config(GymConfig, new)
    assert {k: getattr(cfg, k) for k in GYM_NEW} == GYM_NEW and cfg.gae_lambda == 0.9


def test_gym_cli_prints_the_notice(tmp_path, capsys):
    """pg-lm gym captures argparse's output for its one-line errors: the notice still reaches stderr."""
    from pg_lm.cli import main

    code = main(["gym", "--output-dir", str(tmp_path), "--progress", "false", "--total-steps", "64",
                 "--num-envs", "2", "--n-steps", "16", "--eval-episodes", "1", "--epochs", "1"])
    assert code == 0
    assert notices(capsys) == ["--epochs is deprecated: use --ppo-epochs"]
    assert json.loads((tmp_path / "config.json").read_text())["ppo_epochs"] == 1


def test_old_and_new_name_together_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_config(LMConfig, ["--lam", "0.9", "--gae-lambda", "0.8"], prog="pg-lm lm")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("pg-lm lm: error: the command line gives both --lam and --gae-lambda, the old and the new "
                   "name of one field: keep --gae-lambda")
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nppo_epochs: 3\n")
    with pytest.raises(SystemExit):
        parse_config(GymConfig, ["--config", str(path)], prog="pg-lm gym")
    assert "gives both epochs and ppo_epochs" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "lam: 0.85\nppo_epochs: 2\n"),
    (".json", '{"lam": 0.85, "ppo-epochs": 2}'),
])
def test_old_name_in_a_config_file(tmp_path, capsys, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = parse_config(LMConfig, ["--config", str(path)])
    assert (cfg.gae_lambda, cfg.ppo_epochs) == (0.85, 2)
    assert notices(capsys) == [f"lam in {path} is deprecated: use gae_lambda"]
    # a flag still wins over the file, whichever name either uses
    assert parse_config(LMConfig, ["--config", str(path), "--gae-lambda", "0.5"]).gae_lambda == 0.5
    assert parse_config(LMConfig, ["--config", str(path), "--lam", "0.4"]).gae_lambda == 0.4


def test_old_name_in_a_scripts_keyword_defaults(capsys):
    cfg = parse_config(GymConfig, [], ent_coef=0.02)
    assert cfg.entropy_coef == 0.02
    assert notices(capsys) == ["ent_coef= is deprecated: use entropy_coef="]
    assert parse_config(GymConfig, ["--entropy-coef", "0.03"], ent_coef=0.02).entropy_coef == 0.03  # flags win


def test_no_notice_on_the_other_processes_of_a_launch(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert parse_config(LMConfig, ["--lam", "0.9"]).gae_lambda == 0.9
    assert notices(capsys) == []


def test_old_flags_are_left_out_of_help(capsys):
    with pytest.raises(SystemExit):
        parse_config(GymConfig, ["--help"])
    out = capsys.readouterr().out
    assert "--ppo-epochs" in out and "--epochs" not in out.replace("--ppo-epochs", "")


def test_a_saved_config_with_old_names_loads():
    """A run's config.json written before the rename: every old gym field is read as its new one."""
    saved = {"env": "CartPole-v1", "algo": "ppo", "epochs": 3, "minibatches": 2, "ent_coef": 0.01,
             "clip_value": 0.2, "norm_adv": False, "gae_lambda": 0.9}
    cfg = from_dict(GymConfig, saved)
    assert {k: getattr(cfg, k) for k in GYM_NEW} == GYM_NEW and cfg.gae_lambda == 0.9
    assert from_dict(LMConfig, {"lam": 0.5, "ent_coef": 0.1}).gae_lambda == 0.5


def test_preset_tables_written_with_old_names(monkeypatch):
    """A gym defaults row or an LM --loss-type preset naming a field the old way sets the field."""
    from pg_lm.gym import config as gym_config
    from pg_lm.gym.config import defaults_for, resolve
    from pg_lm.lm import presets

    rows = {**gym_config.DEFAULTS, ("CartPole-v1", "a2c"): {"lr": 2e-3, "gamma": 0.98, "lam": 0.7, "ent_coef": 0.03}}
    monkeypatch.setattr(gym_config, "DEFAULTS", rows)
    assert defaults_for("CartPole-v1", "a2c")["gae_lambda"] == 0.7
    cfg = resolve(GymConfig(env="CartPole-v1", algo="a2c"))
    assert (cfg.gae_lambda, cfg.entropy_coef) == (0.7, 0.03)

    old = presets.Preset("an old preset", {"estimator": "gae"}, {"lam": 0.8, "epochs": 2})
    assert old.tunable == {"gae_lambda": 0.8, "ppo_epochs": 2}
    monkeypatch.setitem(presets.PRESETS, "grpo", old)
    cfg = LMConfig(loss_type="grpo")
    assert (cfg.estimator, cfg.gae_lambda, cfg.ppo_epochs) == ("gae", 0.8, 2)
