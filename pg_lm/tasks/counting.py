"""A task with a dense (per-token) reward: continue a count.

"Count up from 17: write the next 5 numbers, separated by spaces." The target is "18 19 20 21 22".
The reward is per token: each completion token earns the share of the target's characters it
correctly adds (the decoded completion up to and including it, stripped on the left, is still a
prefix of the target); from the first token that breaks the prefix on, tokens earn 0. A completion's
total is the fraction of the target it wrote before its first mistake, and each token's credit is
its own part of it. The reward function names ``completion_ids`` and ``tokenizer``, which the
trainer passes (see pg_lm/lm/rewards.py).
"""

from __future__ import annotations

import random

from datasets import Dataset

COUNT = 5


def prefix_credit(pieces: list[str], target: str) -> list[float]:
    """Per-piece credit for the decoded prefixes ``pieces`` (``pieces[i]`` = text of tokens 0..i).

    >>> prefix_credit(["1", "18", "18 ", "18 1", "18 19", "18 19x"], "18 19")
    [0.2, 0.2, 0.2, 0.2, 0.2, 0.0]
    >>> prefix_credit(["2", "21"], "18 19")
    [0.0, 0.0]
    """
    out, done, broken = [], 0, False
    for text in pieces:
        text = text.lstrip()
        if not broken and target.startswith(text):
            out.append((len(text) - done) / len(target))
            done = len(text)
        else:
            broken = True
            out.append(0.0)
    return out


def count_progress(prompts, completions, completion_ids, tokenizer, target, **_) -> list[list[float]]:
    """One reward per completion token: its share of the target it correctly adds (see the module docstring)."""
    out = []
    for ids, t in zip(completion_ids, target):
        pieces = [tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
        out.append(prefix_credit(pieces, str(t)))
    return out


def counting(num_eval: int = 100, seed: int = 0):
    """(train, held-out, [count_progress]): start numbers 1..899 split at random; columns ``prompt``, ``target``."""
    starts = list(range(1, 900))
    random.Random(seed).shuffle(starts)
    rows = lambda ss: {"prompt": [f"Count up from {s}: write the next {COUNT} numbers, separated by spaces." for s in ss],
                       "target": [" ".join(str(s + i) for i in range(1, COUNT + 1)) for s in ss]}
    return Dataset.from_dict(rows(starts[num_eval:])), Dataset.from_dict(rows(starts[:num_eval])), [count_progress]
