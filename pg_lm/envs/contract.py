"""The text-environment contract's checks, and a random policy's success rate (a task's base rate)."""

from __future__ import annotations

import math
import random
from typing import Callable


class EnvError(ValueError):
    """An environment broke the contract (or raised): the message names it and the episode."""


def _name(env) -> str:
    return type(env).__name__


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def check_reset(env, obs, episode: int):
    """``obs`` if it is what ``reset`` must return (a string or chat messages), else :class:`EnvError`."""
    if isinstance(obs, str) or _is_messages(obs):
        return obs
    raise EnvError(f"{_name(env)}.reset (episode {episode}) returned {type(obs).__name__}: expected a string or a "
                   f"list of chat messages [{{'role': ..., 'content': ...}}]")


def check_step(env, out, episode: int) -> tuple[str, float, bool, bool, dict]:
    """``out`` as (observation, reward, terminated, truncated, info) if ``step`` returned that, with a
    finite reward; else :class:`EnvError` naming what is wrong."""
    where = f"{_name(env)}.step (episode {episode})"
    if not isinstance(out, tuple) or len(out) != 5:
        raise EnvError(f"{where} returned {type(out).__name__}"
                       f"{f' of {len(out)}' if isinstance(out, tuple) else ''}: expected "
                       "(observation, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = out
    if not isinstance(obs, str):
        raise EnvError(f"{where}: the observation is {type(obs).__name__}, expected a string")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise EnvError(f"{where}: the reward is {reward!r}, expected a finite number")
    if not isinstance(terminated, bool) or not isinstance(truncated, bool):
        raise EnvError(f"{where}: terminated and truncated must be bools, got {terminated!r}, {truncated!r}")
    return obs, float(reward), terminated, truncated, info if isinstance(info, dict) else {}


def random_success_rate(make_env: Callable, act: Callable[[random.Random, str], str], episodes: int = 200,
                        max_turns: int = 8, seed: int = 0) -> float:
    """The share of ``episodes`` in which the policy ``act(rng, observation) -> action`` reaches a
    positive total reward within ``max_turns`` turns: a task's base rate."""
    rng, wins = random.Random(seed), 0
    for k in range(episodes):
        env = make_env()
        obs, total = check_reset(env, env.reset(seed=seed * 100_003 + k), k), 0.0
        for _ in range(max_turns):
            obs, reward, terminated, truncated, _ = check_step(env, env.step(act(rng, obs)), k)
            total += reward
            if terminated or truncated:
                break
        wins += total > 0
    return wins / episodes
