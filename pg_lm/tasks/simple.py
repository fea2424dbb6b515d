"""Small reusable reward functions, also the built-in rewards of ``--reward NAME[=ARG]``.

>>> fmt = format_reward(r"^Answer: \\d+$")
>>> fmt(["q", "q"], ["Answer: 12", "12"])
[1.0, 0.0]
>>> length_reward(target=5)(["q"] * 2, ["hello", "hi"])
[0.0, -0.6]
>>> tag_format("answer")(["q"] * 3, ["<answer>4</answer>", "4", "<answer></answer>"])
[1.0, 0.0, 0.0]
>>> exact_column()(["q"] * 2, [" Paris ", "Lyon"], answer=["Paris", "Paris"])
[1.0, 0.0]
"""

from __future__ import annotations

import inspect
import re

from .arithmetic import last_number


def _needs(fn, column: str):
    """``fn`` with a signature naming ``column`` (so a dataset without it is an error before training)."""
    P = inspect.Parameter
    fn.__signature__ = inspect.Signature([P("prompts", P.POSITIONAL_OR_KEYWORD), P("completions", P.POSITIONAL_OR_KEYWORD),
                                          P(column, P.KEYWORD_ONLY), P("columns", P.VAR_KEYWORD)])
    return fn


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


def tag_text(text: str, tag: str) -> str | None:
    """The stripped text inside the only ``<tag>...</tag>`` of ``text``, or None (none, several, or empty)."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    return found[0].strip() or None if len(found) == 1 else None


def tag_format(tag: str = "answer"):
    """1.0 when the completion has exactly one non-empty ``<tag>...</tag>``, else 0.0."""
    def tag_check(prompts, completions, **_):
        return [float(tag_text(c, tag) is not None) for c in completions]

    return tag_check


def last_number_match(column: str = "answer"):
    """1.0 when the completion's last number equals the dataset column ``column``, else 0.0."""
    def last_number_is(prompts, completions, **columns):
        return [float(last_number(c) == str(a).strip()) for c, a in zip(completions, columns[column])]

    return _needs(last_number_is, column)


def exact_column(column: str = "answer"):
    """1.0 when the stripped completion equals the stripped column ``column``, else 0.0."""
    def exact_match_column(prompts, completions, **columns):
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, columns[column])]

    return _needs(exact_match_column, column)


def _length(arg: str):
    try:
        return length_reward(int(arg))
    except ValueError:
        raise ValueError(f"length=N needs a whole number of characters, got {arg!r}") from None


# name -> (factory taking the text after "=" or nothing, whether that text is required, what it is)
BUILTIN_REWARDS = {
    "last_number": (last_number_match, False, "the last number equals column COLUMN (default answer)"),
    "exact": (exact_column, False, "the stripped completion equals column COLUMN (default answer)"),
    "regex": (format_reward, True, "re.search(PATTERN) matches the stripped completion"),
    "tag": (tag_format, False, "exactly one non-empty <NAME>...</NAME> (default answer)"),
    "length": (_length, True, "-|characters - N| / N"),
}
