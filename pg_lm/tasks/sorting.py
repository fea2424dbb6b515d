"""A task whose answer is a short list: sort three numbers.

"Sort in ascending order: 42, 7, 19. Answer with the numbers separated by commas." The reward reads
the first three numbers of the completion: 1.0 when they are the sorted list, else 0.3 for each
position that holds its number (partial credit on the way, at most 0.6 for a wrong list).

>>> sorting_reward(["p"] * 4, ["7, 19, 42", "7, 42, 19", "42, 19, 7", "7"], answer=["7, 19, 42"] * 4)
[1.0, 0.3, 0.3, 0.3]
"""

from __future__ import annotations

import random
import re

from datasets import Dataset

_INT = re.compile(r"-?\d+")
SIZE = 3


def sorting_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0: the first three numbers are the sorted list; else 0.3 per number in its place."""
    out = []
    for c, a in zip(completions, answer):
        want, got = a.split(", "), _INT.findall(c)[:SIZE]
        out.append(1.0 if got == want else 0.3 * sum(g == w for g, w in zip(got, want)))
    return out


def sorting(num_eval: int = 100, seed: int = 0):
    """(train, held-out, [sorting_reward]): three distinct numbers 1..99 in a shuffled order, each set
    once; columns ``prompt``, ``answer``."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < 3000 + num_eval:
        nums = rng.sample(range(1, 100), SIZE)
        if frozenset(nums) not in seen:
            seen.add(frozenset(nums))
            rows.append(nums)
    cols = lambda rs: {"prompt": [f"Sort in ascending order: {', '.join(map(str, r))}. Answer with the numbers "
                                  "separated by commas." for r in rs],
                       "answer": [", ".join(map(str, sorted(r))) for r in rs]}
    return Dataset.from_dict(cols(rows[num_eval:])), Dataset.from_dict(cols(rows[:num_eval])), [sorting_reward]
