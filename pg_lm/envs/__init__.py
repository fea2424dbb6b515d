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

__all__ = ["EnvError", "GuessNumber", "GymText", "ToolArithmetic", "check_reset", "check_step", "frozen_lake",
           "random_success_rate"]
