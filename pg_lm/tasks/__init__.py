"""Built-in tasks: prompt datasets with their reward functions.

``TASKS[name]()`` returns ``(train_dataset, eval_dataset, reward_functions)``.
"""

from __future__ import annotations

from .arithmetic import arithmetic_datasets, exact_match
from .simple import format_reward, length_reward


def arithmetic(num_eval: int = 100, seed: int = 0):
    train, held_out = arithmetic_datasets(num_eval=num_eval, seed=seed)
    return train, held_out, [exact_match]


TASKS = {"arithmetic": arithmetic}

__all__ = ["TASKS", "arithmetic", "arithmetic_datasets", "exact_match", "format_reward", "length_reward"]
