"""Small reusable reward functions: a format check and a length target.

>>> fmt = format_reward(r"^Answer: \\d+$")
>>> fmt(["q", "q"], ["Answer: 12", "12"])
[1.0, 0.0]
>>> length_reward(target=5)(["q"] * 2, ["hello", "hi"])
[0.0, -0.6]
"""

from __future__ import annotations

import re


def format_reward(pattern: str, reward: float = 1.0):
    """A reward function giving ``reward`` to completions that match ``pattern`` (``re.search``, stripped)."""
    rx = re.compile(pattern, re.DOTALL)

    def format_match(prompts, completions, **_):
        return [reward if rx.search(c.strip()) else 0.0 for c in completions]

    return format_match


def length_reward(target: int, scale: float | None = None):
    """A reward function ``-|len(completion) - target| / scale`` in characters (scale defaults to target)."""
    scale = float(scale or target)

    def length_target(prompts, completions, **_):
        return [round(-abs(len(c) - target) / scale, 6) for c in completions]

    return length_target
