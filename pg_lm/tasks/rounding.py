"""A task with partial credit for a near miss: round to the nearest hundred.

"Round 347 to the nearest hundred." The reward is 1.0 for the last number written being 300, 0.5 for
a near miss -- the number rounded to the nearest ten instead (350), an easier answer a policy can
settle on -- and 0.0 otherwise. A group-baseline run that locks onto the near miss stops learning:
every sample scores 0.5, every advantage is 0 (pg_lm/lm/monitor.py says so).

>>> rounding_reward(["p"] * 4, ["300", "It is 350.", "347", "300 or 400"], answer=["300"] * 4, number=[347] * 4)
[1.0, 0.5, 0.0, 0.0]
"""

from __future__ import annotations

import random

from datasets import Dataset

from .arithmetic import last_number


def _round(n: int, to: int) -> int:
    """``n`` rounded to the nearest multiple of ``to``, halves up (347 -> 300, 350 -> 400)."""
    return (n + to // 2) // to * to


def rounding_reward(prompts, completions, answer, number, **_) -> list[float]:
    """1.0: the last number is the nearest hundred; 0.5: it is the nearest ten instead; else 0.0."""
    out = []
    for c, a, n in zip(completions, answer, number):
        got = last_number(c)
        out.append(1.0 if got == str(a) else 0.5 if got == str(_round(int(n), 10)) else 0.0)
    return out


def rounding(num_eval: int = 100, seed: int = 0):
    """(train, held-out, [rounding_reward]): numbers 101..999 not already a multiple of ten; columns
    ``prompt``, ``answer``, ``number``."""
    numbers = [n for n in range(101, 1000) if n % 10]
    random.Random(seed).shuffle(numbers)
    rows = lambda ns: {"prompt": [f"Round {n} to the nearest hundred." for n in ns],
                       "answer": [str(_round(n, 100)) for n in ns], "number": list(ns)}
    return Dataset.from_dict(rows(numbers[num_eval:])), Dataset.from_dict(rows(numbers[:num_eval])), [rounding_reward]
