"""Text environments for episodes of many turns: Gymnasium's ``reset`` / ``step`` semantics over
strings, no torch.

The contract (checked by :func:`check_reset` / :func:`check_step` on every call):

* ``reset(*, seed: int, row: dict | None = None) -> observation`` -- start an episode. ``seed``
  fixes everything random in it (the G episodes of a group share one seed, so a group baseline
  compares episodes from the same start); ``row`` is the dataset row when there is a dataset. The
  observation is a string (the user's first message) or a list of chat messages.
* ``step(action: str) -> (observation, reward, terminated, truncated, info)`` -- the policy's turn,
  as text; the environment's answer (a string, "" at the end), the turn's reward (a float),
  ``terminated`` (a true end: nothing is bootstrapped), ``truncated`` (cut: bootstrapped), a dict.

Shipped: :class:`GuessNumber` (higher / lower feedback), :class:`ToolArithmetic` (three-digit
arithmetic with a calculator the model calls in plain text), :class:`GymText` (any Gymnasium
environment with a renderer and a parser; FrozenLake-v1 as :func:`frozen_lake`).
"""

from .contract import EnvError, check_reset, check_step, random_success_rate
from .games import GuessNumber, ToolArithmetic
from .gym_text import GymText, frozen_lake

ENVS = {"guess": GuessNumber, "tool": ToolArithmetic, "frozenlake": frozen_lake}  # --env NAME


def load_env(spec: str):
    """A function making a new environment for ``--env spec``: a built-in name of :data:`ENVS`, or
    ``path/to/file.py:Class`` / ``module:Class`` (a class, or any function, called with no arguments)."""
    import importlib
    from pathlib import Path

    from pg_lm.lm.reward_specs import _import_file

    if spec in ENVS:
        return ENVS[spec]
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name.isidentifier():
        raise ValueError(f"--env {spec}: expected a built-in ({', '.join(ENVS)}), path/to/file.py:Class or module:Class")
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser(), spec, "--env")
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"--env {spec}: cannot import module {target!r} ({e})") from None
    make = getattr(module, name, None)
    if not callable(make):
        raise ValueError(f"--env {spec}: {target} has no class or function {name!r}")
    return make


__all__ = ["ENVS", "EnvError", "GuessNumber", "GymText", "ToolArithmetic", "check_reset", "check_step", "frozen_lake",
           "load_env", "random_success_rate"]
