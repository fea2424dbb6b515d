"""Reward functions named on the command line: ``--reward path/to/file.py:function``,
``--reward package.module:function``, or a built-in ``--reward NAME[=ARG]``
(:data:`pg_lm.tasks.simple.BUILTIN_REWARDS`), plus ``--reward-model PATH``.

Every spec is resolved before any model is loaded; a bad one is a one-line ``ValueError``
naming it (the CLI exits 2).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import zlib
from pathlib import Path


def _builtin_names() -> str:
    from pg_lm.tasks.simple import BUILTIN_REWARDS

    return ", ".join(f"{n}=..." if required else n for n, (_, required, _) in BUILTIN_REWARDS.items())


def _functions_of(module) -> list[str]:
    """The public functions (and callable classes) defined in ``module``, for an error message."""
    return sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                  and getattr(v, "__module__", None) == module.__name__)


def _import_file(path: Path, spec: str, flag: str = "--reward"):
    if not path.is_file():
        raise ValueError(f"{flag} {spec}: no such file {str(path)!r}")
    name = f"pg_lm_reward_{path.stem}_{zlib.crc32(str(path.resolve()).encode()):08x}"  # one module per file
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # (so that dataclasses, pickling and the like work in it)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"{flag} {spec}: importing {path} raised {type(e).__name__}: {e}") from None
    return module


def load_reward(spec: str):
    """The reward function named by ``spec`` (see the module docstring)."""
    from pg_lm.tasks.simple import BUILTIN_REWARDS

    head, eq, arg = spec.partition("=")
    if head in BUILTIN_REWARDS:
        factory, required, _ = BUILTIN_REWARDS[head]
        if required and not arg:
            raise ValueError(f"--reward {spec}: the built-in {head!r} needs a value: {head}=...")
        try:
            return factory(arg) if arg else factory()
        except ValueError as e:
            raise ValueError(f"--reward {spec}: {e}") from None
    target, colon, fn_name = spec.rpartition(":")
    if not colon or not target or not fn_name.isidentifier():
        raise ValueError(f"--reward {spec}: expected path/to/file.py:function, module:function, or a built-in "
                         f"({_builtin_names()})")
    if target.endswith(".py"):
        module, where = _import_file(Path(target).expanduser(), spec), target
    else:
        try:
            module, where = importlib.import_module(target), f"module {target}"
        except ImportError as e:
            raise ValueError(f"--reward {spec}: cannot import module {target!r} ({e})") from None
        except Exception as e:
            raise ValueError(f"--reward {spec}: importing {target} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        has = _functions_of(module)
        raise ValueError(f"--reward {spec}: {where} has no function {fn_name!r}; it has: {', '.join(has) or 'none'}")
    if inspect.isclass(fn):  # a class with __call__: its instance (made with no arguments) is the reward function
        try:
            fn = fn()
        except Exception as e:
            raise ValueError(f"--reward {spec}: {fn_name}() raised {type(e).__name__}: {e}") from None
    return fn


def rewards_from_config(cfg) -> tuple[list, list[float] | None]:
    """(reward functions, weights or None) from ``cfg.reward`` and ``cfg.reward_model``; ([], None)
    when neither is given. The reward model (loaded last, after every spec resolved) runs on
    the trainer's device once the trainer has one."""
    fns = [load_reward(spec) for spec in cfg.reward]
    if cfg.reward_model:
        from .rewards import RewardModel

        try:
            fns.append(RewardModel(cfg.reward_model))
        except OSError as e:
            raise ValueError(f"--reward-model {cfg.reward_model}: cannot load a sequence-classification model "
                             f"({type(e).__name__})") from None
    return fns, (list(cfg.reward_weights) or None)
