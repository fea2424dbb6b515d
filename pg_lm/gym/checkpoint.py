"""Checkpoints of a classic-control run: everything the next update depends on, so that a run
resumed with ``--resume`` is the run that was never stopped (same metrics, same weights, bit for bit).

A checkpoint is taken at a rollout boundary -- after an update and its metrics row -- every
``--save-every`` updates and at the end, and goes through :mod:`pg_lm.run.checkpoints` (sealed
with checksums, rotated to ``--save-total-limit``, a damaged one skipped on resume). Its folder
holds:

* ``policy.pt``: actor, critic and observation-normalisation statistics, in the format of the
  run's final ``policy.pt`` (:func:`~pg_lm.gym.policy.load_policy` reads either);
* ``trainer_state.pt``: the Adam state, the update count, the collector's state (current
  observations, autoreset flags, returns and lengths of the episodes in progress, the recent
  finished episodes, the env-step count, the reward scaler's running statistics), the time spent,
  the structural part of the config, and the Python, NumPy and torch generators (action sampling
  and PPO's minibatch order draw from torch's). The learning rate is a function of the env-step
  count, so there is no scheduler state;
* ``envs.pkl``: the vector env itself, pickled with cloudpickle (Gymnasium's own dependency, the
  one its AsyncVectorEnv uses to send envs to worker processes).

Why the env is pickled rather than re-created and reseeded: A2C and PPO carry episodes across
rollouts, so at any rollout boundary most envs are mid-episode, and what their next step returns
depends on state only the env object holds -- CartPole's float64 physical state (the observation
is its float32 rounding), Pendulum's angle (the observation has its cosine and sine), each time
limit's step counter, each env's ``np_random`` that the next reset draws from. Re-creating the
envs from a seed and the saved observations cannot restore these exactly, and restoring them
attribute by attribute would be code per env. Replaying the recorded actions from the seed is
generic but costs a pass over the whole run. A pickle holds all of it for any env whose state is
plain Python and NumPy (every classic-control env); an env that cannot be pickled (one holding a
native handle, e.g. Box2D bodies) is refused when a run with ``--save-every`` starts, naming the
env. A checkpoint is tied to the installed Gymnasium version, as any pickle is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import torch

from pg_lm.run import RunWriter, to_dict
from pg_lm.run.checkpoints import commit, find_resumable, rng_state, set_rng_state
from pg_lm.run.config import rename_aliases

from .config import GymConfig
from .policy import ActorCritic, save_policy
from .rollout import Collector

# what a checkpoint must agree with the resuming run on: the shapes of the weights and of the
# saved envs, and what the saved state means. Other flags (total steps, lr, ...) may change.
STRUCTURE = ("env", "algo", "num_envs", "vector_mode", "hidden", "obs_norm", "reward_norm")


@dataclass
class RunState:
    """One training run's state: what a checkpoint saves, and the loop's clocks."""

    cfg: GymConfig
    policy: ActorCritic
    opt: torch.optim.Optimizer
    collector: Collector
    writer: RunWriter
    t0: float  # perf_counter at env creation, minus the wall time earlier runs spent (summary wall_s)
    start: float  # perf_counter at the first rollout, minus the training time earlier runs spent (train_s)
    updates: int = 0  # optimisation rounds (rollouts) so far; --save-every counts these
    saved: tuple[int, Path] | None = None  # (env steps, folder) of this run's newest checkpoint
    signal: int | None = None  # SIGINT / SIGTERM caught: stop after this update (pg_lm/run/signals.py)


def check_saveable(envs, env_id: str) -> None:
    """ValueError (one line) when the vector env cannot be checkpointed."""
    try:
        cloudpickle.dumps(envs)
    except Exception as e:  # pickling fails with whatever the unpicklable object raises
        raise ValueError(f"--save-every: {env_id} cannot be checkpointed: its state does not pickle "
                         f"({type(e).__name__}: {e})") from None


def save_checkpoint(run: RunState, now: float) -> Path:
    """Write the run's state as the newest checkpoint (``now``: the current perf_counter)."""
    cfg, c = run.cfg, run.collector
    state = {"updates": run.updates, "optimizer": run.opt.state_dict(), "collector": c.state_dict(),
             "train_s": now - run.start, "wall_s": now - run.t0, "rng": rng_state(),
             "structure": {k: getattr(cfg, k) for k in STRUCTURE}}
    envs = cloudpickle.dumps(c.envs)

    def write(folder: Path) -> None:
        save_policy(run.policy, folder / "policy.pt", to_dict(cfg))
        torch.save(state, folder / "trainer_state.pt")
        (folder / "envs.pkl").write_bytes(envs)

    run.saved = c.steps, commit(cfg.output_dir, c.steps, write, cfg.save_total_limit)
    return run.saved[1]


def find_checkpoint(cfg: GymConfig) -> tuple[Path, dict]:
    """The newest intact checkpoint in ``cfg.output_dir`` and its trainer state; ValueError (one
    line) when there is none or it was saved by a run of another shape (naming the flag)."""
    try:
        path = find_resumable(cfg.output_dir)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    # a checkpoint saved before a field was renamed names it the old way (pg_lm.run.config.ALIASES)
    state["structure"] = rename_aliases(GymConfig, state["structure"], str(path))[0]
    for key, saved in state["structure"].items():
        if getattr(cfg, key) != saved:
            raise ValueError(f"--resume: {path} was saved with --{key.replace('_', '-')} {saved}, this run has "
                             f"{getattr(cfg, key)}; resume with the same value or choose another --output-dir")
    return path, state


def load_checkpoint(run: RunState, path: Path, state: dict, now: float) -> None:
    """Put the run back in the state saved at ``path``: weights, optimizer, collector and its envs
    (the collector's current envs are closed), clocks, and last every random generator."""
    blob = torch.load(path / "policy.pt", map_location="cpu", weights_only=True)
    run.policy.load_state_dict(blob["state_dict"])  # in place: obs_rms's numpy views stay valid
    run.opt.load_state_dict(state["optimizer"])
    envs = pickle.loads((path / "envs.pkl").read_bytes())
    old = run.collector.envs
    run.collector.load_state_dict(state["collector"], envs)
    old.close()
    run.updates, run.saved = state["updates"], (run.collector.steps, path)
    run.t0, run.start = now - state["wall_s"], now - state["train_s"]
    set_rng_state(state["rng"])
