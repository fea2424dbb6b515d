"""Built-in tasks: prompt datasets generated offline from a seed, with their reward functions.

``TASKS[name](num_eval=100, seed=0)`` returns ``(train_dataset, eval_dataset, reward_functions)``.

- ``arithmetic``: "What is 23 + 45?", exact match on the last number.
- ``countdown``: reach a target from given numbers with + - * /; the reward checks the expression.
- ``tagged``: "Which is larger, 37 or 52?", the answer required inside ``<answer></answer>``.
- ``counting``: continue a count; a dense reward, one value per completion token.
- ``rounding``: "Round 347 to the nearest hundred."; partial credit (0.5) for the near miss 350.
- ``sorting``: "Sort in ascending order: 42, 7, 19."; a short list, 0.3 per number in its place.
"""

from __future__ import annotations

from .arithmetic import arithmetic_datasets, exact_match
from .countdown import countdown, countdown_reward
from .counting import count_progress, counting
from .rounding import rounding, rounding_reward
from .simple import BUILTIN_REWARDS, format_reward, length_reward, tag_format
from .sorting import sorting, sorting_reward
from .tagged import tagged, tagged_answer


def arithmetic(num_eval: int = 100, seed: int = 0):
    train, held_out = arithmetic_datasets(num_eval=num_eval, seed=seed)
    return train, held_out, [exact_match]


TASKS = {"arithmetic": arithmetic, "countdown": countdown, "tagged": tagged, "counting": counting, "rounding": rounding,
         "sorting": sorting}

__all__ = ["BUILTIN_REWARDS", "TASKS", "arithmetic", "arithmetic_datasets", "count_progress", "counting", "countdown",
           "countdown_reward", "exact_match", "format_reward", "length_reward", "rounding", "rounding_reward", "sorting",
           "sorting_reward", "tag_format", "tagged", "tagged_answer"]
