"""How a reward function is called: one convention that serves pg_lm's documented
``fn(prompts, completions, **columns)`` and TRL's ``GRPOTrainer``, which passes every argument by
keyword (``fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``), so
that a function written for either runs unchanged. The contract itself is in ``rewards.py``.

The signature decides, once per function: a function whose first two parameters take the prompts
and the completions positionally (``def f(p, c, **columns)``) is called so; any other
(``def reward_len(completions, **kwargs)``, ``def f(completion_ids, **kwargs)``) by keyword.
For ``def f(prompts, completions, ...)`` the two calls are the same.

>>> by_keyword(lambda completions, **kwargs: None), by_keyword(lambda p, c, **columns: None)
(True, False)
>>> needed_columns(lambda completions, topic, **kwargs: None)
['topic']
>>> c = as_completions(["hello"])[0]
>>> c.upper(), c[0]["content"], c[0]["role"]
('HELLO', 'hello', 'assistant')
"""

from __future__ import annotations

import inspect

PASSED = ("prompts", "completions")  # to every function
INJECTED = ("completion_ids", "tokenizer", "trainer_state", "log_extra", "log_metric")  # to a function naming one
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def parameters(fn) -> list[inspect.Parameter] | None:
    """``fn``'s parameters, or None for a builtin or an object ``inspect`` cannot read."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def by_keyword(fn) -> bool:
    """Whether ``fn`` is called with every argument by keyword (TRL's call) rather than as
    ``fn(prompts, completions, **rest)``: when its first two parameters cannot take the prompts and
    the completions positionally, or are named after something else that is passed by name
    (``completions`` first, ``completion_ids``, a ``completions`` parameter further on)."""
    params = parameters(fn)
    if params is None or any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
                             for p in params[:2]):
        return False  # a builtin, (*args) or (p, c, /): the positional call, as always
    lead = [p for p in params[:2] if p.kind in _POSITIONAL]
    if len(lead) < 2:
        return True  # (completions, **kwargs), (completion_ids, **kwargs), (**kwargs)
    first, second = lead[0].name, lead[1].name
    elsewhere = any(p.name == "completions" for p in params[2:])
    return first in PASSED[1:] + INJECTED or second in PASSED[:1] + INJECTED or elsewhere


def needed_columns(fn) -> list[str]:
    """The dataset columns ``fn`` needs: its parameters without a default that are not passed
    anyway (the prompts and completions, whether by position or by name, and :data:`INJECTED`);
    a ``**columns`` catch-all needs none."""
    params = parameters(fn)
    if params is None:
        return []
    rest = params if by_keyword(fn) else params[2:]
    return [p.name for p in rest if p.default is p.empty and p.kind not in _VARIADIC
            and p.name not in PASSED + INJECTED]


def _ignore(*args, **kwargs) -> None:
    """TRL's ``log_extra`` / ``log_metric``, for a function that names them: pg_lm logs each
    function's mean itself (``reward/<name>``) and keeps no extra columns."""


def arguments(fn, prompts: list, completions: list, columns: dict, extras: dict | None) -> tuple[tuple, dict]:
    """The positional and keyword arguments of one call of ``fn`` (see the module docstring):
    the prompts, the completions and the columns, and each of ``extras`` (``completion_ids`` (a
    list per completion, or a function making it), ``tokenizer``, ``trainer_state``) that ``fn``
    names. A function without ``**kwargs`` gets only the keywords it names."""
    kw = dict(columns)
    names = {p.name for p in parameters(fn) or []}
    given = {"trainer_state": None, **(extras or {}), "log_extra": _ignore, "log_metric": _ignore}
    for key, value in given.items():
        if key in names and (value is not None or key == "trainer_state"):
            kw[key] = value() if callable(value) and key == "completion_ids" else value
    if not by_keyword(fn):
        return (prompts, completions), _accepted(fn, kw, skip=2)
    kw.update(prompts=prompts, completions=completions)
    return (), _accepted(fn, kw, skip=0)


def _accepted(fn, kw: dict, skip: int) -> dict:
    """``kw`` less the names ``fn`` cannot take (it has no ``**kwargs``; its first ``skip``
    parameters are filled by position). A signature that cannot be read takes everything."""
    params = parameters(fn)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kw
    takes = {p.name for p in params[skip:] if p.kind not in _VARIADIC and p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {k: v for k, v in kw.items() if k in takes}


class Completion(str):
    """A completion as reward functions get it: its text, as pg_lm's contract gives it, that also
    reads as the one-message list TRL gives for a chat prompt (``completion[0]["content"]``,
    ``completion[-1]["role"]``), so a function written for either form of prompt works on both.
    ``completion[i]`` is still the i-th character, which answers ``["content"]`` and ``["role"]``
    too; an empty completion's ``[0]`` / ``[-1]`` is an empty string that does."""

    def __getitem__(self, key):
        if isinstance(key, int):
            char = super().__getitem__(key) if self or key not in (0, -1) else ""
            return _MessageView(char, str(self))
        return super().__getitem__(key)


class _MessageView(str):
    """One character of a :class:`Completion` that also reads as its assistant message."""

    def __new__(cls, char: str, text: str):
        view = super().__new__(cls, char)
        view._message = {"role": "assistant", "content": text}
        return view

    def __getnewargs__(self):
        return str(self), self._message["content"]

    def __getitem__(self, key):
        return self._message[key] if isinstance(key, str) else super().__getitem__(key)

    def get(self, key, default=None):
        return self._message.get(key, default)

    def keys(self):
        return self._message.keys()


def as_completions(completions: list[str]) -> list[Completion]:
    """``completions`` as reward functions get them (:class:`Completion`)."""
    return [Completion(c) for c in completions]
