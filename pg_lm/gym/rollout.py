"""Vector-env rollouts -> one ``Rollout`` record of ``(B, T)`` tensors for the core.

Gymnasium 1.x vector envs autoreset on the NEXT step: the step that ends an episode
returns the episode's *final* observation; the following ``step`` ignores its action,
resets that env and returns (reset obs, reward 0, not done). So:

* that following step is not a real transition: ``mask = 0`` there (no return, no
  advantage, no loss);
* the stored observation after an episode end IS the final observation, so
  ``next_values[:, t] = values[:, t + 1]`` is ``V(final obs)`` -- the core bootstraps
  from it on truncation and ignores it on termination;
* the last column bootstraps from ``V(current obs)``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .policy import ActorCritic, RunningMeanStd


@dataclass
class Rollout:
    """One batch of experience; time-major buffers transposed to the core's (B, T)."""

    obs: Tensor  # (B, T, D) normalised observations the actions were taken on
    actions: Tensor  # (B, T) int64, or (B, T, A) float: the unclipped samples
    logp: Tensor  # (B, T) log π_old(a_t | s_t) at sampling time
    values: Tensor  # (B, T) V(s_t) at sampling time (0 without a critic)
    next_values: Tensor  # (B, T) V(s_{t+1}); after an episode end, V(final obs)
    rewards: Tensor  # (B, T) rewards (scaled when reward_norm is on)
    terminated: Tensor  # (B, T) bool: true terminal state at t, no bootstrap
    truncated: Tensor  # (B, T) bool: time limit at t, bootstrap from next_values
    mask: Tensor  # (B, T) bool: 1 = a real step of an episode this batch learns from


class _Step(NamedTuple):
    """One vector-env step, (B, ...) arrays; ``_to_rollout`` stacks T of them into a Rollout."""

    obs: Tensor  # (B, D) normalised observation the action was taken on
    actions: Tensor
    logp: Tensor
    values: Tensor
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    mask: np.ndarray  # (B,) bool: False on the autoreset step (and on dropped episodes)


class RewardScaler:
    """Divide rewards by the running std of the discounted return (SB3 ``VecNormalize``).

    Only the scale changes (no mean shift), so the optimal policy is the same."""

    def __init__(self, num_envs: int, gamma: float, clip: float = 10.0):
        self.gamma, self.clip = gamma, clip
        self.ret = np.zeros(num_envs)
        self.rms = RunningMeanStd(1)

    def __call__(self, reward: np.ndarray, valid: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.ret = np.where(valid, self.ret * self.gamma + reward, self.ret)
        self.rms.update(self.ret[valid, None])
        self.ret[done] = 0.0
        scale = float(np.sqrt(self.rms._var[0] + 1e-8))
        return np.clip(reward / scale, -self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"ret": self.ret.copy(), "rms": self.rms.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ret = state["ret"].copy()
        self.rms.load_state_dict(state["rms"])  # in place: the numpy views stay valid


class Collector:
    """Steps the vector env with the policy and keeps the episode statistics.

    ``collect(n)`` returns the next ``n`` steps per env (envs carry on across calls:
    a2c, ppo, trpo). ``collect(n, complete=True)`` returns whole episodes (reinforce): see there.
    """

    def __init__(self, envs, policy: ActorCritic, seed: int, reward_scaler: RewardScaler | None = None):
        self.envs, self.policy, self.scaler = envs, policy, reward_scaler
        self.obs, _ = envs.reset(seed=seed)
        B = envs.num_envs
        self.prev_done = np.zeros(B, bool)  # the env's next step is an autoreset step
        self.ep_return, self.ep_length = np.zeros(B), np.zeros(B, np.int64)
        self.episodes: deque[tuple[float, int]] = deque(maxlen=100)  # recent (return, length)
        self.new_episodes: list[tuple[float, int]] = []  # finished since the last collect()
        self.steps = 0  # env steps so far, all envs together, masked ones included

    @torch.no_grad()
    def _step(self) -> _Step:
        x = self.policy.normalize(self.obs, update=True)  # (B, D)
        actions, logp, values = self.policy.act(x)
        obs, reward, term, trunc, _ = self.envs.step(self.policy.head.to_env(actions))
        valid = ~self.prev_done  # after a done, this step only reset the env
        done = term | trunc
        self.ep_return += reward * valid
        self.ep_length += valid
        for b in np.flatnonzero(done):
            self.episodes.append((float(self.ep_return[b]), int(self.ep_length[b])))
            self.new_episodes.append(self.episodes[-1])
        self.ep_return[done], self.ep_length[done] = 0.0, 0
        if self.scaler is not None:
            reward = self.scaler(reward, valid, done)
        self.prev_done, self.obs = done, obs
        self.steps += len(valid)
        return _Step(x, actions, logp, values, reward, term, trunc, valid)

    def collect(self, n_steps: int, complete: bool = False) -> Rollout:
        """``n_steps`` steps per env; with ``complete``, whole episodes instead.

        Monte-Carlo REINFORCE has no critic to bootstrap an episode cut by the rollout
        boundary, and simply dropping cut episodes is biased (it keeps the episodes that
        end soon, i.e. the short ones). So ``complete`` resets every env, keeps each
        episode that *starts* by step ``n_steps`` -- a rule that does not look at the
        future, hence unbiased -- and steps on until all of them have ended.
        Steps of later episodes (envs waiting for the slowest one) are masked and wasted;
        they still count as env steps. A guard ends the rollout after ``n_steps`` +
        the env's time limit, masking any episode still running (envs with no limit).
        """
        limit = n_steps
        if complete:
            self.obs, _ = self.envs.reset()
            self.prev_done[:] = False
            self.ep_return[:], self.ep_length[:] = 0.0, 0
            if self.scaler is not None:
                self.scaler.ret[:] = 0.0
            limit = n_steps + (_time_limit(self.envs) or n_steps)
        open_ = np.ones(self.envs.num_envs, bool)  # the env's current episode belongs to the batch
        rows: list[_Step] = []
        for t in itertools.count():
            row = self._step()
            if complete:
                row = row._replace(mask=row.mask & open_)
                open_ &= ~(self.prev_done & (t + 1 >= n_steps))  # the next episode starts too late
            rows.append(row)
            if t + 1 >= n_steps and not (complete and open_.any() and t + 1 < limit):
                break
        if complete and open_.any():  # only after the guard: mask what follows each env's last done
            done = np.stack([r.terminated | r.truncated for r in rows])  # (T, B)
            tail = np.flip(np.cumsum(np.flip(done, 0), 0), 0) == 0  # (T, B) no done at or after t
            rows = [r._replace(mask=r.mask & ~tail[t]) for t, r in enumerate(rows)]
        return self._to_rollout(rows)

    @torch.no_grad()
    def _to_rollout(self, rows: list[_Step]) -> Rollout:
        cols = {f: torch.stack([torch.as_tensor(s) for s in seq], 1) for f, seq in zip(_Step._fields, zip(*rows))}
        last = self.policy.value(self.policy.normalize(self.obs))  # (B,) V(current obs)
        next_values = torch.cat([cols["values"][:, 1:], last[:, None]], 1)  # (B, T)
        cols["rewards"] = cols["rewards"].float()
        return Rollout(**cols, next_values=next_values)  # time-major steps stacked on dim 1: (B, T, ...)

    def state_dict(self) -> dict:
        """What the next rollout depends on besides the policy and the envs themselves (which
        pg_lm/gym/checkpoint.py saves whole): the current observations, the autoreset flags,
        the episodes in progress and the statistics of finished ones, the step count."""
        return {"obs": self.obs.copy(), "prev_done": self.prev_done.copy(), "ep_return": self.ep_return.copy(),
                "ep_length": self.ep_length.copy(), "episodes": list(self.episodes),
                "new_episodes": list(self.new_episodes), "steps": self.steps,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict, envs) -> None:
        """Continue from ``state`` with ``envs``, the vector env saved with it (the caller closes the old one)."""
        self.envs = envs
        self.obs, self.prev_done = state["obs"].copy(), state["prev_done"].copy()
        self.ep_return, self.ep_length = state["ep_return"].copy(), state["ep_length"].copy()
        self.episodes = deque(state["episodes"], maxlen=self.episodes.maxlen)
        self.new_episodes, self.steps = list(state["new_episodes"]), state["steps"]
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])

    def pop_episodes(self) -> list[tuple[float, int]]:
        """(return, length) of the episodes finished since the last call (raw rewards)."""
        out, self.new_episodes = self.new_episodes, []
        return out


def _time_limit(envs) -> int | None:
    spec = getattr(envs, "spec", None) or getattr(envs.unwrapped, "spec", None)
    return getattr(spec, "max_episode_steps", None)
