"""End-to-end runs with tiny budgets: every algorithm, outputs, reproducibility, CLI errors, the recipe."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from pg_lm.cli import main as cli_main
from pg_lm.gym import GymConfig, load_policy, train

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"env_steps", "charts/episodic_return", "charts/episodic_length", "loss/policy", "loss/value",
               "policy/entropy", "policy/clip_frac", "policy/approx_kl_k3", "value/explained_var", "perf/steps_per_s"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_run_writes_every_output(tmp_path):
    summary = train(GymConfig(total_steps=2048, output_dir=str(tmp_path), progress=False))
    for name in ("config.json", "metrics.jsonl", "summary.json", "returns.png", "policy.pt"):
        assert (tmp_path / name).exists(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["gamma"] == 0.98 and config["num_envs"] == 16, "config.json holds the resolved config"
    rows = _rows(tmp_path)
    assert METRIC_KEYS <= set().union(*rows)
    assert all({"env_steps", "loss/policy", "perf/steps_per_s"} <= set(r) for r in rows)
    assert rows[-1]["env_steps"] == 2048 == summary["env_steps"], "the last rollout is cut to total_steps"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval/return_mean", "eval/return_std", "env_steps", "wall_s"):
        assert on_disk[key] == summary[key]
    assert summary["eval/episodes"] == 20
    policy = load_policy(tmp_path / "policy.pt")
    assert policy.act(torch.zeros(1, 4), deterministic=True)[0].shape == (1,)


@pytest.mark.parametrize("env, algo", [
    ("CartPole-v1", "reinforce"), ("CartPole-v1", "reinforce-baseline"), ("CartPole-v1", "a2c"),
    ("Pendulum-v1", "ppo"), ("Pendulum-v1", "a2c"), ("Pendulum-v1", "reinforce"),
    ("Acrobot-v1", "ppo"),  # no native vector env: SyncVectorEnv
])
def test_each_algorithm_runs_end_to_end(tmp_path, env, algo):
    cfg = GymConfig(env=env, algo=algo, total_steps=1200, num_envs=2, n_steps=64, num_minibatches=2,
                    eval_episodes=2, output_dir=str(tmp_path), progress=False)
    summary = train(cfg)
    rows = _rows(tmp_path)
    assert rows and summary["env_steps"] >= 1200
    assert ("loss/value" in rows[-1]) == (algo != "reinforce"), "plain REINFORCE has no critic"
    assert all(r["loss/policy"] == r["loss/policy"] for r in rows), "no NaN losses"
    if algo.startswith("reinforce"):
        assert sum(1 for r in rows if "charts/episodic_return" in r) == len(rows), "whole episodes every rollout"


def test_training_changes_the_policy_and_obs_stats(tmp_path):
    cfg = GymConfig(env="Pendulum-v1", total_steps=1024, num_envs=2, n_steps=256, ppo_epochs=2, num_minibatches=4,
                    eval_episodes=1, output_dir=str(tmp_path), progress=False)
    train(cfg)
    policy = load_policy(tmp_path / "policy.pt")
    assert policy.obs_rms is not None and float(policy.obs_rms.count) > 1000
    assert float(policy.head.log_std.detach()) != pytest.approx(-0.5), "the Gaussian log-std is trained"


def test_seeded_runs_are_reproducible(tmp_path):
    def run(name, seed=0):
        out = tmp_path / name
        train(GymConfig(total_steps=1536, seed=seed, eval_episodes=3, output_dir=str(out), progress=False))
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in _rows(out)]

    first = run("a")
    assert first == run("b")
    assert first != run("c", seed=1)


def test_callback_sees_every_update_and_can_stop(tmp_path):
    seen = []

    def callback(policy, row):
        seen.append(row["env_steps"])
        return row["env_steps"] >= 1024

    summary = train(GymConfig(total_steps=4096, eval_episodes=2, output_dir=str(tmp_path), progress=False), callback)
    assert seen == [512, 1024] and summary["env_steps"] == 1024
    assert [r["env_steps"] for r in _rows(tmp_path)] == seen


def test_train_leaves_callers_torch_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train(GymConfig(total_steps=512, eval_episodes=1, output_dir=str(tmp_path), progress=False, threads=1))
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


@pytest.mark.parametrize("argv, match", [
    (["--total-steps", "-5"], "total_steps must be > 0"),
    (["--env", "NoSuchEnv-v0"], "unknown environment"),
    (["--algo", "sac"], "invalid choice"),
    (["--total-steps", "lots"], "invalid"),
    (["--no-such-flag", "1"], "unrecognized arguments"),
    (["--env", "FrozenLake-v1"], "observations must be a flat Box"),
    (["--env", "Pendulum-v1", "--vector-mode", "vector_entry_point"], "no native vector"),
    (["--num-minibatches", "100000"], "exceeds the rollout size"),  # only known once the defaults are filled in
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    code = cli_main(["gym", "--output-dir", str(tmp_path), "--progress", "false", "--total-steps", "64", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and match in err, err


def test_cli_success_prints_the_evaluation(tmp_path, capsys):
    code = cli_main(["gym", "--total-steps", "512", "--eval-episodes", "2", "--progress", "false",
                     "--output-dir", str(tmp_path)])
    assert code == 0
    assert "eval return" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, env", [("cartpole.py", "CartPole-v1"), ("pendulum.py", "Pendulum-v1")])
def test_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys, recipe, env):
    # in-process (runpy) rather than a subprocess: the same __main__ path without a second torch import
    argv = [recipe, "--total-steps", "1024", "--eval-episodes", "2", "--progress", "false",
            "--output-dir", str(tmp_path)] + (["--n-steps", "128", "--ppo-epochs", "1"] if env == "Pendulum-v1" else [])
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "recipes" / recipe), run_name="__main__")
    assert f"ppo {env}: eval return" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"] == env and summary["algo"] == "ppo" and summary["env_steps"] == 1024
