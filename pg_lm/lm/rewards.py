"""Reward functions: plain callables, checked, weighted and combined. This docstring is the
reward contract (docs/data-and-rewards.md shows it with examples). A function written for TRL's
``GRPOTrainer`` meets it unchanged.

**Call.** Once per batch, with ``prompts`` as the dataset gives them (strings, or lists of chat
messages), ``completions`` the decoded texts (special tokens stripped) and each of the prompt
dataset's other fields (e.g. ``answer``) as a keyword, a list with one entry per completion. The
signature picks the form (``reward_calling``): ``fn(prompts, completions, **columns)``, pg_lm's
form, when the first two parameters take them by position (``def f(p, c, **columns)``); else
TRL's, every argument by keyword (``def reward_len(completions, **kwargs)``,
``def f(completions, topic, **kwargs)``). A function may also name these, passed only to a
function that names them: ``completion_ids`` (each completion's token ids, a list of ints, EOS
included when sampled), ``tokenizer`` (the policy's tokenizer), ``trainer_state`` (TRL's training
progress, ``global_step`` and ``max_steps``: ``RewardSet.trainer_state``, which the trainer sets
each step; None outside training), and TRL's ``log_extra`` / ``log_metric``
(accepted, and ignored). A function without ``**kwargs`` gets only the keywords it names.

**Completions.** Each is its text (a ``str``) that also reads as the one-message list TRL passes
for a chat prompt: ``completion[0]["content"]`` is the text, ``completion[0]["role"]`` is
``"assistant"``. So ``c.strip()`` and TRL's ``[c[0]["content"] for c in completions]`` both work,
whatever the prompt.

**Columns it needs.** A parameter without a default that is not one of the above names a
dataset column the function needs: a dataset without it is an error before training starts.
``**columns`` takes whatever columns there are.

**Return.** One value per completion: a number (the reward arrives at the completion's last
token), or, for a dense reward, a list of numbers with one entry per completion token, i.e.
``len(completion_ids[i])`` entries, or None: not applicable to this completion (as in TRL). A
number may be a Python or NumPy number, a 0-d tensor, or a bool (True counts 1.0, False 0.0);
NaN, inf and anything else are an error naming the function and the sample.

**None.** A None adds nothing to the weighted sum (TRL's ``nansum`` over functions) and counts 0
in the function's own total (``reward/<name>``). A completion that every function left None
scores 0 with a :class:`RewardWarning`; TRL instead leaves it out of its group's baseline. Under a
group baseline a group left None throughout gets zero advantages either way.

**Async.** A function may be ``async def``: it is awaited; several async functions of one
``RewardSet`` are awaited concurrently (one event loop, ``asyncio.gather``). ``--reward-timeout``
applies to async and plain functions alike.

**Weights.** ``RewardSet(fns, weights)`` sums ``w_k * r_k`` per token; each function's total is
reported as ``reward/<name>``.

>>> def shorter_is_better(prompts, completions, **columns):
...     return [-len(c) / 4 for c in completions]
>>> rs = RewardSet([shorter_is_better])
>>> per_fn, dense = rs.score(["p", "p"], ["ab", "abcd"], {}, lengths=[2, 3])
>>> per_fn["shorter_is_better"].tolist(), dense.tolist()
([-0.5, -1.0], [[0.0, -0.5, 0.0], [0.0, 0.0, -1.0]])
>>> def reward_len(completions, **kwargs):  # TRL's form
...     return [-abs(4 - len(c)) for c in completions]
>>> RewardSet([reward_len]).score(["p", "p"], ["ab", "abcd"], {}, lengths=[2, 3])[0]["reward_len"].tolist()
[-2.0, 0.0]
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import warnings
from numbers import Real
from typing import Callable, Sequence

import torch
from torch import Tensor

from .reward_calling import arguments, as_completions, needed_columns

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; names the function and sample."""


class RewardWarning(UserWarning):
    """Every reward function returned None (not applicable) for a completion, which then scores 0."""


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


def is_async(fn) -> bool:
    """Whether ``fn`` (a function, or an object whose ``__call__`` is) is ``async def``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _run_coroutine(coro):
    """Run ``coro`` to its end: in this thread, or in a helper thread when this thread already runs
    an event loop (a notebook), where ``asyncio.run`` cannot."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def run():
        try:
            box["out"] = asyncio.run(coro)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, name="reward-async", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def _within(timeout: float | None, name: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or a RewardError naming ``name`` after ``timeout`` seconds. The call
    runs in a daemon thread, which a hung function keeps; the process can still exit."""
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
        who = name() if callable(name) else name  # (a function of what is still running, for several at once)
        raise RewardError(f"reward function {who!r} did not return within {timeout:g} s (--reward-timeout)")
    if "error" in box:
        raise box["error"]
    return box["out"]


def _invoke(fn, prompts, completions, columns: dict, extras: dict | None):
    """One call of ``fn`` (positional or by keyword, see ``reward_calling``), awaited when it is async."""
    args, kwargs = arguments(fn, prompts, completions, columns, extras)
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        async def wait():
            return await out
        out = _run_coroutine(wait())
    return out


def _user_error(name: str, e: Exception) -> RewardError:
    return RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}")


def _call(fn, name: str, prompts, completions, columns: dict, extras: dict | None, timeout: float | None):
    """``fn``'s raw output (within ``timeout`` seconds; awaited when async); what it raises becomes
    a RewardError naming it."""
    try:
        return _within(timeout, name, _invoke, fn, prompts, completions, columns, extras)
    except RewardError:
        raise
    except Exception as e:  # the user's code: say whose it was and stop
        raise _user_error(name, e) from e


def call_reward(fn, prompts: list, completions: list[str], columns: dict, lengths: Sequence[int],
                timeout: float | None = None, extras: dict | None = None) -> Tensor:
    """Call one reward function (within ``timeout`` seconds; awaited when async) and validate its
    output -> (B, T) dense rewards. ``extras``: ``completion_ids`` (a list per completion, or a
    function making it), ``tokenizer`` and ``trainer_state``, passed when ``fn`` names them.

    Scalars land on each completion's last token; per-token lists must have one entry
    per completion token; None (not applicable) is a row of zeros. ``lengths`` are completion
    lengths in tokens.
    """
    name = reward_name(fn)
    out = _call(fn, name, prompts, as_completions(completions), columns, extras, timeout)
    return to_dense(name, out, completions, lengths)


def to_dense(name: str, out, completions: list[str], lengths: Sequence[int]) -> Tensor:
    """A reward function's output, validated -> (B, T) dense rewards (see the module docstring)."""
    return _dense(name, out, completions, lengths)[0]


def _dense(name: str, out, completions: list[str], lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
    """:func:`to_dense`, and (B,) bool: whether the function scored each completion (not None)."""
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"reward function {name!r} returned {type(out).__name__}, expected a list") from None
    if len(out) != len(completions):
        raise RewardError(f"reward function {name!r} returned {len(out)} values for {len(completions)} completions")
    T = max(max(lengths, default=1), 1)
    dense = torch.zeros(len(out), T)  # host: built from Python numbers; the trainer moves it to its device
    for i, (x, n) in enumerate(zip(out, lengths)):
        if x is None:  # not applicable to this completion (TRL's None): nothing from this function
            continue
        if _is_per_token(x):
            vals = [_check_number(name, i, v, completions[i]) for v in (x if isinstance(x, (list, tuple)) else x.tolist())]
            if len(vals) != n:
                raise RewardError(f"reward function {name!r} returned {len(vals)} per-token rewards for "
                                  f"sample {i}, which has {n} completion tokens")
            dense[i, :n] = torch.tensor(vals)  # host: into the host tensor above
        else:
            dense[i, max(n - 1, 0)] = _check_number(name, i, x, completions[i])
    return dense, torch.tensor([x is not None for x in out], dtype=torch.bool)  # host: like dense


def _gather(fns, names, prompts, completions, columns: dict, extras: dict | None, timeout: float | None) -> list:
    """The outputs of the async functions ``fns``, awaited concurrently in one event loop, all
    within ``timeout`` (they run side by side, so each has the whole of it)."""
    done: set[int] = set()

    async def one(i, fn):
        args, kwargs = arguments(fn, prompts, completions, columns, extras)
        out = await fn(*args, **kwargs)
        done.add(i)
        return out

    async def all_of_them():
        return await asyncio.gather(*(one(i, fn) for i, fn in enumerate(fns)), return_exceptions=True)

    def pending() -> str:  # the first function still running when the time is up
        return next((names[i] for i in range(len(fns)) if i not in done), names[0])

    outs = _within(timeout, pending, _run_coroutine, all_of_them())
    for name, out in zip(names, outs):
        if isinstance(out, RewardError):
            raise out
        if isinstance(out, Exception):
            raise _user_error(name, out) from out
    return outs


class RewardSet:
    """Several reward functions combined with weights: ``r = sum_k w_k r_k``.

    Each function's per-completion total is reported separately (``reward/<name>``).
    """

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None, timeout: float | None = None):
        self.timeout = timeout  # seconds per call of each function (None = no limit)
        self.trainer_state = None  # what a function naming ``trainer_state`` gets (TRL: the training progress)
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

    def score(self, prompts, completions, columns, lengths, completion_ids: Tensor | None = None,
              tokenizer=None) -> tuple[dict[str, Tensor], Tensor]:
        """-> ({name: (B,) total reward of that function}, (B, T) weighted dense reward).
        ``completion_ids`` (B, T), ``tokenizer`` and :attr:`trainer_state` reach the functions that
        name them; async functions are awaited together. A None from a function adds nothing to the
        weighted sum (TRL's nansum) and counts 0 in its total; a completion that every function
        left None scores 0, with a warning."""
        def ids():  # made once, and only when a function asks for it
            if "ids" not in cache:
                rows = completion_ids.tolist()
                cache["ids"] = [row[:n] for row, n in zip(rows, lengths)]
            return cache["ids"]

        cache: dict = {}
        extras = {"completion_ids": ids if completion_ids is not None else None, "tokenizer": tokenizer,
                  "trainer_state": self.trainer_state}
        texts, completions = completions, as_completions(completions)
        asyncs = [i for i, fn in enumerate(self.fns) if is_async(fn)]
        outs = {}
        if len(asyncs) > 1:
            got = _gather([self.fns[i] for i in asyncs], [self.names[i] for i in asyncs], prompts, completions,
                          columns, extras, self.timeout)
            outs = dict(zip(asyncs, got))
        per_fn, total, scored = {}, None, None
        for i, (fn, w, name) in enumerate(zip(self.fns, self.weights, self.names)):
            out = outs[i] if i in outs else _call(fn, name, prompts, completions, columns, extras, self.timeout)
            dense, applied = _dense(name, out, texts, lengths)
            per_fn[name] = dense.sum(1)
            total = w * dense if total is None else total + w * dense
            scored = applied if scored is None else scored | applied
        if not scored.all():
            warnings.warn(f"every reward function ({', '.join(self.names)}) returned None for some completions "
                          "(not applicable): they score 0", RewardWarning, stacklevel=2)
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
