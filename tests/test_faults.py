"""The fault matrix (README, "Reliability"): each fault, injected, and what pg_lm does about it.

* a NaN / inf in the reward, the sampler's log-probs, the advantage, a log-prob, an importance weight,
  the loss or a gradient: the update is
  skipped (weights and optimizer state untouched) and counted (``health/skipped_steps``);
  ``--max-bad-steps`` in a row stop the run with an error naming the step and the quantity;
* non-finite weights are never written to a checkpoint;
* SIGINT / SIGTERM: the step under way finishes, a checkpoint is saved, exit 130 / 143;
* 2 processes: an error in one stops the other within a second with that error (even when the
  failed process stays alive); an evaluation set that does not split evenly does not hang.

SIGKILL and resume: tests/test_lm_exact_resume.py; damaged checkpoints: tests/test_lm_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pg_lm.lm.estimate
import pg_lm.lm.loss as loss_module
import pg_lm.lm.trainer as trainer_module
from lm_fixtures import make_trainer, read_jsonl, snapshot
from pg_lm.lm.trainer import QUANTITIES, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread
ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def inject(tr, monkeypatch, quantity: str, steps: set[int]) -> None:
    """Make ``quantity`` non-finite on the (1-based) training ``steps`` of ``tr``."""
    on = lambda: tr.step + 1 in steps  # noqa: E731  (tr.step counts the steps already done)
    if quantity == "reward":
        real = pg_lm.lm.estimate.token_rewards

        def token_rewards(*a, **kw):
            r, kl = real(*a, **kw)
            return (r + NAN if on() else r), kl
        monkeypatch.setattr(pg_lm.lm.estimate, "token_rewards", token_rewards)
    elif quantity == "advantage":
        real = tr.advantages
        monkeypatch.setattr(tr, "advantages", lambda b: (lambda a, r: (a * torch.inf if on() else a, r))(*real(b)))
    elif quantity == "log-prob":
        real = tr.forward

        def forward(batch, grad, model=None):
            out = real(batch, grad, model)
            return (out[0] + NAN, *out[1:]) if grad and on() else out
        monkeypatch.setattr(tr, "forward", forward)
    elif quantity == "loss":
        real = loss_module.policy_loss

        def policy_loss(logp, *a, **kw):
            loss, clipped = real(logp, *a, **kw)
            return (loss * NAN if on() else loss), clipped
        monkeypatch.setattr(loss_module, "policy_loss", policy_loss)
    elif quantity == "sampler log-prob":
        real = trainer_module.sample

        def sample(*a, **kw):
            b = real(*a, **kw)
            if on():
                b.sampler_logp = b.sampler_logp + NAN
            return b
        monkeypatch.setattr(trainer_module, "sample", sample)
    elif quantity == "IS weight":
        real = loss_module.sampler_is_weights

        def sampler_is_weights(*a, **kw):
            w, capped = real(*a, **kw)
            return (w * NAN if on() else w), capped
        monkeypatch.setattr(loss_module, "sampler_is_weights", sampler_is_weights)
    elif quantity == "gradient":
        p = tr.params[0]
        p.register_hook(lambda g: g * NAN if on() else g)


def optimizer_steps(tr) -> int:
    state = tr.opt.state_dict()["state"]
    return int(max((float(s["step"]) for s in state.values()), default=0))


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_a_nonfinite_value_skips_the_update_and_is_counted(tiny_lm_dir, tmp_path, monkeypatch, quantity):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, lr=1e-2)
    inject(tr, monkeypatch, quantity, steps={2})
    weights, seen = [], []
    real_step = tr.train_step

    def step():
        out = real_step()
        weights.append(snapshot(tr.policy))
        seen.append(optimizer_steps(tr))
        return out
    tr.train_step = step
    tr.train()
    for name, w in weights[1].items():  # step 2 changed nothing: weights ...
        assert torch.equal(w, weights[0][name]), name
    assert seen == [1, 1, 2]  # ... and no optimizer step (Adam's moments and count untouched)
    assert any(not torch.equal(w, weights[1][n]) for n, w in weights[2].items())  # step 3 trained again
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert [r["health/skipped_steps"] for r in rows] == [0, 1, 1]


@pytest.mark.parametrize("quantity", QUANTITIES)
def test_max_bad_steps_in_a_row_stop_the_run_naming_the_step_and_the_quantity(tiny_lm_dir, tmp_path, monkeypatch,
                                                                              quantity):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=6, save_every=1, max_bad_steps=2, lr=1e-2)
    inject(tr, monkeypatch, quantity, steps={2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=f"step 3: non-finite {quantity} \\(2 updates in a row"):
        tr.train()
    state = torch.load(tmp_path / "checkpoint-last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["skipped_steps"] == 1  # step 2 (skipped) was saved; step 3 stopped the run


def test_nonfinite_weights_are_never_saved(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=1)
    with torch.no_grad():
        tr.params[0].view(-1)[0] = torch.inf
    with pytest.raises(ValueError, match="not saving step 1: parameter .* holds a non-finite value"):
        tr.train()
    assert not (tmp_path / "checkpoint-last").exists()


def cli(model_dir, out, *flags):
    return [sys.executable, "-m", "pg_lm.cli", "lm", "--model", str(model_dir), "--output-dir", str(out),
            "--max-steps", "500", "--progress", "false", "--eval-size", "2", "--mixed-precision", "no",
            "--lora-r", "0", "--lr", "1e-5", "--lr-schedule", "constant", "--samples-per-prompt", "4", "--max-new-tokens", "24", *flags]  # full fine-tuning, as before the defaults became the recipe's


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tiny_lm_dir, tmp_path, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cli(tiny_lm_dir, tmp_path), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and '"reward/mean"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name} after step" in err and "Traceback" not in err
    step = json.loads((tmp_path / "summary.json").read_text())["train/steps"]
    state = torch.load(tmp_path / "checkpoint-last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == step >= 1
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] == sig.name
    resumed = subprocess.run(cli(tiny_lm_dir, tmp_path, "--resume", "--max-steps", str(step + 1)), env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["train/steps"] == step + 1


def launch_two(model_dir, out, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", "2",
           str(Path(__file__).with_name("fault_worker.py")), str(model_dir), str(out), mode]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        err = proc.communicate(timeout=240)[1]
    finally:  # the launcher and both workers, whatever happened
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err, time.time() - t0


@pytest.mark.two_process
@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_an_error_in_one_process_stops_both_with_that_error(tiny_lm_dir, tmp_path, mode):
    code, err, seconds = launch_two(tiny_lm_dir, tmp_path, mode)
    assert code != 0
    # rank 0 names rank 1's error (not a closed socket), even when rank 1's process stays alive
    assert ("error: stopping: rank 1: RewardError: reward function 'reward' raised RuntimeError: "
            "reward server unreachable") in err, err[-4000:]
    assert seconds < 120  # (start-up included; without the watch, "hang" waits for the launcher's 300 s timeout)


@pytest.mark.two_process
def test_an_uneven_evaluation_split_over_two_processes_does_not_hang(tiny_lm_dir, tmp_path):
    code, err, _ = launch_two(tiny_lm_dir, tmp_path, "uneven")
    assert code == 0, err[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train/steps"] == 3 and "eval/reward_after" in summary
