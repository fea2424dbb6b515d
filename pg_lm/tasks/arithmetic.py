"""Two-digit addition: "What is 23 + 45?", rewarded by exact match on the last number.

>>> exact_match(["What is 1 + 2?"] * 3, ["The answer is 3.", "3 + 1 = 4", "no idea"], answer=["3"] * 3)
[1.0, 0.0, 0.0]
"""

from __future__ import annotations

import random
import re

from datasets import Dataset

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (commas dropped), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion's last number equals ``answer``, else 0.0."""
    return [float(last_number(c) == str(a)) for c, a in zip(completions, answer)]


def addition_pairs(seed: int = 0) -> list[tuple[int, int]]:
    """All 8,100 two-digit pairs (10..99) in a fixed shuffled order."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def arithmetic_datasets(num_eval: int = 100, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out eval) datasets with columns ``prompt`` and ``answer``; disjoint pairs."""
    pairs = addition_pairs(seed)
    rows = lambda ps: {"prompt": [f"What is {a} + {b}?" for a, b in ps], "answer": [str(a + b) for a, b in ps]}
    return Dataset.from_dict(rows(pairs[num_eval:])), Dataset.from_dict(rows(pairs[:num_eval]))
