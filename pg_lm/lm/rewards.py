"""Reward functions: plain callables, checked, weighted and combined.

A reward function is ``fn(prompts, completions, **columns) -> list``, where
``columns`` are the prompt dataset's other fields (e.g. ``answer``), one entry per
completion. It returns one float per completion (the reward arrives at its last
token) or, for dense rewards, one list of floats per completion with one entry per
completion token. A value may be a Python or NumPy number, a 0-d tensor, or a bool (True
counts 1.0, False 0.0); NaN, inf and anything else are an error naming the function and the
sample. A parameter after ``completions`` without a default names a dataset column the
function needs: a dataset without it is an error before training starts.

>>> def shorter_is_better(prompts, completions, **columns):
...     return [-len(c) / 4 for c in completions]
>>> rs = RewardSet([shorter_is_better])
>>> per_fn, dense = rs.score(["p", "p"], ["ab", "abcd"], {}, lengths=[2, 3])
>>> per_fn["shorter_is_better"].tolist(), dense.tolist()
([-0.5, -1.0], [[0.0, -0.5, 0.0], [0.0, 0.0, -1.0]])
"""

from __future__ import annotations

import inspect
import math
import threading
from numbers import Real
from typing import Callable, Sequence

import torch
from torch import Tensor

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; names the function and sample."""


def reward_name(fn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _is_per_token(x) -> bool:
    """A list/tuple, or a 1-d tensor / array: one reward per completion token."""
    return isinstance(x, (list, tuple)) or (getattr(x, "ndim", None) == 1 and hasattr(x, "tolist"))


def _check_number(name: str, i: int, x, completion: str) -> float:
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):  # a 0-d tensor / numpy scalar
        x = x.item()
    if isinstance(x, bool):  # (a NumPy bool is one after .item())
        x = float(x)
    if not isinstance(x, Real):
        raise RewardError(f"reward function {name!r} returned {x!r} ({type(x).__name__}) for sample {i} "
                          f"({completion[:60]!r}); expected a number")
    x = float(x)
    if not math.isfinite(x):
        raise RewardError(f"reward function {name!r} returned {x} for sample {i} ({completion[:60]!r})")
    return x


def needed_columns(fn) -> list[str]:
    """The dataset columns ``fn`` needs: its parameters after ``(prompts, completions)`` that
    have no default (a ``**columns`` catch-all needs none)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or an object inspect cannot read
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rest = params[2:] if all(p.kind in positional for p in params[:2]) else params
    return [p.name for p in rest if p.default is p.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def _within(timeout: float | None, name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or a RewardError after ``timeout`` seconds. The call runs in a
    daemon thread, which a hung function keeps; the process can still exit."""
    if timeout is None:
        return fn(*args, **kwargs)
    box: dict = {}

    def run():
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(f"reward function {name!r} did not return within {timeout:g} s (--reward-timeout)")
    if "error" in box:
        raise box["error"]
    return box["out"]


def call_reward(fn, prompts: list[str], completions: list[str], columns: dict, lengths: Sequence[int],
                timeout: float | None = None) -> Tensor:
    """Call one reward function (within ``timeout`` seconds) and validate its output -> (B, T) dense rewards.

    Scalars land on each completion's last token; per-token lists must have one entry
    per completion token. ``lengths`` are completion lengths in tokens.
    """
    name = reward_name(fn)
    try:
        out = _within(timeout, name, fn, prompts, completions, **columns)
    except RewardError:
        raise
    except Exception as e:  # the user's code: say whose it was and stop
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"reward function {name!r} returned {type(out).__name__}, expected a list") from None
    if len(out) != len(completions):
        raise RewardError(f"reward function {name!r} returned {len(out)} values for {len(completions)} completions")
    T = max(max(lengths, default=1), 1)
    dense = torch.zeros(len(out), T)  # host: built from Python numbers; the trainer moves it to its device
    for i, (x, n) in enumerate(zip(out, lengths)):
        if _is_per_token(x):
            vals = [_check_number(name, i, v, completions[i]) for v in (x if isinstance(x, (list, tuple)) else x.tolist())]
            if len(vals) != n:
                raise RewardError(f"reward function {name!r} returned {len(vals)} per-token rewards for "
                                  f"sample {i}, which has {n} completion tokens")
            dense[i, :n] = torch.tensor(vals)  # host: into the host tensor above
        else:
            dense[i, max(n - 1, 0)] = _check_number(name, i, x, completions[i])
    return dense


class RewardSet:
    """Several reward functions combined with weights: ``r = sum_k w_k r_k``.

    Each function's per-completion total is reported separately (``reward/<name>``).
    """

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None, timeout: float | None = None):
        self.timeout = timeout  # seconds per call of each function (None = no limit)
        if not fns:
            raise ValueError("at least one reward function is needed")
        self.fns = list(fns)
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.fns)} reward functions")
        self.names = []  # unique: two closures of one factory share a __name__ but not a metric
        for f in self.fns:
            name, k = reward_name(f), 2
            if name in ("mean", "std"):  # would shadow reward/mean and reward/std
                name = f"{name}_fn"
            while name in self.names:
                name, k = f"{reward_name(f)}_{k}", k + 1
            self.names.append(name)

    def check_columns(self, columns: Sequence[str], what: str) -> None:
        """A ``ValueError`` naming the function and the column when a function needs a column
        that the ``what`` dataset (e.g. "training") does not have."""
        for fn, name in zip(self.fns, self.names):
            missing = [c for c in needed_columns(fn) if c not in columns]
            if missing:
                raise ValueError(f"reward function {name!r} needs the column {missing[0]!r}, which the {what} "
                                 f"dataset does not have (it has: {', '.join(columns)})")

    def score(self, prompts, completions, columns, lengths) -> tuple[dict[str, Tensor], Tensor]:
        """-> ({name: (B,) total reward of that function}, (B, T) weighted dense reward)."""
        per_fn, total = {}, None
        for fn, w, name in zip(self.fns, self.weights, self.names):
            dense = call_reward(fn, prompts, completions, columns, lengths, self.timeout)
            per_fn[name] = dense.sum(1)
            total = w * dense if total is None else total + w * dense
        return per_fn, total


class RewardModel:
    """A Hugging Face sequence-classification model as a reward function.

    The score of a completion is the model's first logit on ``prompt + completion``
    (with the reward model's chat template when it has one). Texts over ``max_length``
    tokens lose their *beginning*: the completion, which is what is scored, is kept.
    """

    def __init__(self, model, tokenizer=None, batch_size: int = 16, max_length: int = 1024, name: str = "reward_model"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("RewardModel needs a tokenizer when given a model object")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length, self.__name__ = batch_size, max_length, name

    def _text(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template writes its own BOS
        device = next(self.model.parameters()).device
        scores = []
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length,
                                     add_special_tokens=not templated).to(device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        finally:
            self.tokenizer.truncation_side = side
        return scores
