"""Kill a classic-control run mid-rollout (SIGKILL), resume it with ``--resume``, and get the same
run: the same metrics (every key but timings) at every step, the same summary and the same final
weights bit for bit, as the run that was never stopped. End to end through the CLI, the killed run
and its resume each in a process of its own (the uninterrupted reference runs in-process): CartPole
(native vector env, Categorical head) with REINFORCE, PPO and TRPO, Pendulum (SyncVectorEnv, Gaussian
head, observation and reward normalisation) with PPO. SIGTERM stops a run cleanly after saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from gymnasium.envs.classic_control import CartPoleEnv

from pg_lm.cli import main as cli_main
from pg_lm.run.checkpoints import CHECKSUMS, LAST, checkpoints, sha256, step_of
from pg_lm.run.config import ALIASES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
TIMING = ("perf/", "train_s", "wall_s", "time_to_target_s")

CASES = {
    "cartpole-reinforce": ["--env", "CartPole-v1", "--algo", "reinforce", "--num-envs", "2", "--n-steps", "8",
                           "--total-steps", "300"],
    "cartpole-ppo": ["--env", "CartPole-v1", "--algo", "ppo", "--num-envs", "4", "--n-steps", "8", "--ppo-epochs", "2",
                     "--num-minibatches", "2", "--total-steps", "224"],
    # Pendulum's defaults add observation and reward normalisation: their running statistics are state too
    "cartpole-trpo": ["--env", "CartPole-v1", "--algo", "trpo", "--num-envs", "4", "--n-steps", "8", "--ppo-epochs", "2",
                      "--num-minibatches", "2", "--total-steps", "224"],
    "pendulum-ppo": ["--env", "Pendulum-v1", "--algo", "ppo", "--num-envs", "2", "--n-steps", "16", "--ppo-epochs", "2",
                     "--num-minibatches", "2", "--total-steps", "224"],
}


def flags(out: Path, case: str, *extra: str) -> list[str]:
    return [*CASES[case], "--output-dir", str(out), "--seed", "3", "--save-every", "2", "--eval-episodes", "2",
            "--progress", "false", *extra]


def run(argv: list[str], worker: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(worker or ["-m", "pg_lm.cli", "gym"]), *argv]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith(TIMING)}


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = [untimed(r) for r in rows(a)], [untimed(r) for r in rows(b)]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x == y, f"step {x['step']} differs: " + ", ".join(
            f"{k}: {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
    sa, sb = (untimed(json.loads((p / "summary.json").read_text())) for p in (a, b))
    assert {**sa, "output_dir": None} == {**sb, "output_dir": None}
    wa, wb = (torch.load(p / "policy.pt", weights_only=True)["state_dict"] for p in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"  # bit for bit


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_mid_rollout_then_resume_is_the_same_run(tmp_path, case):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli_main(["gym", *flags(whole, case)]) == 0
    steps = [r["step"] for r in rows(whole)]
    assert len(steps) >= 5
    # killed during the 4th rollout: the checkpoint holds update 2, update 3's row was logged after it
    dead = run([str(steps[2] + 1), *flags(killed, case)], worker=[str(ROOT / "tests" / "gym_kill_worker.py")])
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    assert step_of(killed / LAST) == steps[1] and [r["step"] for r in rows(killed)] == steps[:3]

    resumed = run(flags(killed, case, "--resume"))
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert_same_run(whole, killed)  # update 3's row was dropped and redone, once
    assert step_of(killed / LAST) == steps[-1]  # the end is saved too
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == [f"checkpoint-{steps[-2]}", LAST]  # 2 kept


def one_line_error(argv: list[str], capsys) -> str:
    assert cli_main(["gym", "--progress", "false", "--eval-episodes", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_resume_needs_a_checkpoint_of_the_same_shape(tmp_path, capsys):
    base = ["--output-dir", str(tmp_path), "--total-steps", "128", "--num-envs", "4", "--n-steps", "8",
            "--save-every", "1"]
    assert "no complete checkpoint" in one_line_error([*base, "--resume"], capsys)
    assert cli_main(["gym", "--progress", "false", "--eval-episodes", "1", *base]) == 0
    err = one_line_error([*base, "--resume", "--num-envs", "2"], capsys)
    assert "saved with --num-envs 4, this run has 2" in err
    # a longer budget continues the finished run
    assert cli_main(["gym", "--progress", "false", "--eval-episodes", "1", *base, "--resume",
                     "--total-steps", "192"]) == 0
    assert [r["step"] for r in rows(tmp_path)] == [32, 64, 96, 128, 160, 192]
    # a fresh run in the same folder starts over: the earlier run's checkpoints would outrank its own
    assert cli_main(["gym", "--progress", "false", "--eval-episodes", "1", *base, "--total-steps", "32"]) == 0
    assert "removed 2 checkpoint(s) of an earlier run" in capsys.readouterr().out
    assert [step_of(p) for p in checkpoints(tmp_path)] == [32]


def test_a_run_saved_under_the_old_field_names_resumes(tmp_path, capsys):
    """A run saved before the gym fields took the LM backend's names: its config.json (epochs,
    minibatches, ent_coef, clip_value, norm_adv) given back with --config resumes its checkpoint,
    and a checkpoint whose saved structure names a field the old way is compared under the new name."""
    base = ["--progress", "false", "--eval-episodes", "1", "--output-dir", str(tmp_path), "--num-envs", "2",
            "--n-steps", "16", "--save-every", "1"]
    assert cli_main(["gym", *base, "--total-steps", "64"]) == 0
    new_to_old = {new: old for old, new in ALIASES.items() if old != "lam"}  # gym's λ was always gae_lambda
    saved = json.loads((tmp_path / "config.json").read_text())
    old_config = tmp_path / "old_config.json"
    old_config.write_text(json.dumps({new_to_old.get(k, k): v for k, v in saved.items()}))
    assert {"epochs", "minibatches", "ent_coef", "clip_value", "norm_adv"} <= set(json.loads(old_config.read_text()))
    ckpt = tmp_path / LAST
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state["structure"]["norm_adv"] = saved["whiten_advantages"]
    torch.save(state, ckpt / "trainer_state.pt")
    sums = json.loads((ckpt / CHECKSUMS).read_text())
    sums["files"]["trainer_state.pt"] = sha256(ckpt / "trainer_state.pt")
    (ckpt / CHECKSUMS).write_text(json.dumps(sums))
    capsys.readouterr()

    assert cli_main(["gym", "--config", str(old_config), "--resume", "--whiten-advantages", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the old names' notices, then the error
    assert err[-1].startswith("error: ") and "saved with --whiten-advantages True, this run has False" in err[-1]
    assert cli_main(["gym", "--config", str(old_config), "--resume", "--total-steps", "96"]) == 0
    assert [r["step"] for r in rows(tmp_path)] == [32, 64, 96]
    assert f"epochs in {old_config} is deprecated: use ppo_epochs" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "config.json").read_text())
    assert {k: resumed[k] for k in new_to_old} == {k: saved[k] for k in new_to_old}


class _Unpicklable(CartPoleEnv):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.lock = threading.Lock()  # a native handle, as Box2D's bodies are


def test_an_env_that_cannot_be_saved_is_refused_before_training(tmp_path, capsys):
    gym.register("PgLmTestUnpicklable-v0", entry_point=_Unpicklable, max_episode_steps=50)
    try:
        err = one_line_error(["--env", "PgLmTestUnpicklable-v0", "--output-dir", str(tmp_path),
                              "--total-steps", "64", "--save-every", "1"], capsys)
    finally:
        gym.registry.pop("PgLmTestUnpicklable-v0")
    assert "PgLmTestUnpicklable-v0 cannot be checkpointed" in err and not (tmp_path / "metrics.jsonl").exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    sig = signal.SIGTERM  # SIGINT takes the same path (pg_lm/run/signals.py; both tested for the LM backend)
    argv = [*flags(tmp_path, "cartpole-ppo"), "--total-steps", "100000000", "--save-every", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "pg_lm.cli", "gym", *argv], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name} after step" in err and "Traceback" not in err
    last = rows(tmp_path)[-1]["step"]
    assert step_of(tmp_path / LAST) == last  # the update under way finished, was logged and saved
    assert cli_main(["gym", *argv, "--resume", "--total-steps", str(last + 64)]) == 0
    assert [r["step"] for r in rows(tmp_path)][-3:] == [last, last + 32, last + 64]
