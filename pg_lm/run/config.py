"""Flat config dataclasses <-> command-line flags <-> YAML files.

A config is a dataclass whose every field is declared with :func:`arg`, which takes
its help text, so the documentation lives where the field is declared. Field
``foo_bar`` becomes flag ``--foo-bar``; ``--config file.yaml`` loads the same fields
(flags given on the command line win).

Both backends name a shared concept the same way (``--gae-lambda``, ``--ppo-epochs``, ...).
The names a field had before are kept as aliases in :data:`ALIASES`, the one table that the
parser, config files and saved configs all go through (:func:`rename_aliases`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def arg(default: Any, help: str, choices: tuple | None = None) -> Any:
    """Declare a config field with its default, help text and allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# old name -> the field it now is (the language-model backend's old name, then the classic-control
# one's). An alias applies to every config class that has the new field and no field of the old
# name: ``--lam 0.9`` works for LMConfig, GymConfig and both variance configs alike.
ALIASES: dict[str, str] = {
    "lam": "gae_lambda",
    "epochs": "ppo_epochs",
    "minibatches": "num_minibatches",
    "ent_coef": "entropy_coef",
    "clip_value": "value_clip",
    "norm_adv": "whiten_advantages",
}


def aliases(cls: type) -> dict[str, str]:
    """The entries of :data:`ALIASES` that apply to the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {old: new for old, new in ALIASES.items() if new in names and old not in names}


def rename_aliases(cls: type, values: dict, source: str = "config", flag=lambda name: name) -> tuple[dict, list[str]]:
    """``values`` (field -> value, from flags, a config file or a saved config) with every old name of
    :data:`ALIASES` replaced by its field's, and the old names found. An old name and its new one
    both in ``values`` is a ``ValueError`` naming both: which of the two was meant is unknown.
    ``flag(name)``: how the error names a field (``--gae-lambda`` on the command line)."""
    table = aliases(cls)
    out, found = {}, []
    for key, value in values.items():
        new = table.get(key)
        if new is None:
            out[key] = value
            continue
        if new in values:
            raise ValueError(f"{source} gives both {flag(key)} and {flag(new)}, the old and the new name of "
                             f"one field: keep {flag(new)}")
        out[new] = value
        found.append(key)
    return out, found


def _flag(name: str) -> str:
    """A field's command-line flag: ``gae_lambda`` -> ``--gae-lambda``."""
    return "--" + name.replace("_", "-")


def _notify(lines: list[str]) -> None:
    """Print each line once on stderr, on the first process only (every process of a distributed
    launch parses the same flags; RANK is set by torchrun / accelerate launch)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for line in dict.fromkeys(lines):
        print(line, file=sys.stderr)


TRPO_FIELDS = ("max_kl", "cg_iters", "cg_damping", "line_search_steps", "backtrack_ratio")


def check_trpo(cfg: Any, flag=lambda name: name) -> None:
    """TRPO's step settings (:data:`TRPO_FIELDS`), the same rules in both backends; a ``None`` (a
    default still to resolve) passes. ``flag(name)``: how the error names the field."""
    for name in ("max_kl", "cg_iters", "line_search_steps"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"{flag(name)} must be > 0, got {value}")
    if cfg.cg_damping is not None and cfg.cg_damping < 0:
        raise ValueError(f"{flag('cg_damping')} must be >= 0, got {cfg.cg_damping}")
    if cfg.backtrack_ratio is not None and not 0.0 < cfg.backtrack_ratio < 1.0:
        raise ValueError(f"{flag('backtrack_ratio')} must be in (0, 1), got {cfg.backtrack_ratio}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of an annotation like ``float | None`` or ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _none_or(fn):
    def parse(s: str):
        return None if s.lower() in ("none", "null") else fn(s)
    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass ``cls``."""
    p = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="YAML or JSON file with any of these fields")
    hints = typing.get_type_hints(cls)
    old_names = aliases(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        conv = _parse_bool if tp is bool else tp
        kw: dict[str, Any] = dict(help=f.metadata.get("help", ""), default=argparse.SUPPRESS)
        # "none" is None, except for a field where it is one of the choices (--baseline none)
        kw["type"] = conv if "none" in (f.metadata.get("choices") or ()) else _none_or(conv)
        if is_list:  # --reward a --reward b and --reward a b both give [a, b]
            kw.update(nargs="*", action="extend")
        if tp is bool:
            kw.update(nargs="?", const=True)
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"]) + ([None] if f.default is None else [])
        p.add_argument(_flag(f.name), **kw)
        for old in [o for o, new in old_names.items() if new == f.name]:  # hidden from --help
            p.add_argument(_flag(old), dest=old, **dict(kw, help=argparse.SUPPRESS))
    return p


def load_file(path: str | Path) -> dict:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def _typed(cls: type, values: dict, source: str) -> dict:
    """``values`` (as a YAML / JSON file gives them) converted to the field types of ``cls``, as the
    flags are: YAML reads ``1e-5`` as a string and ``2`` as an int where a float is wanted. A value
    that is not of its field's type is a ``ValueError`` naming the key and the type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        tp, is_list = _base_type(hints[key])

        def one(x):
            if x is None or tp is Any:
                return x
            if isinstance(x, str) and tp is not str:
                return _none_or(_parse_bool if tp is bool else tp)(x)
            if tp is float and isinstance(x, int) and not isinstance(x, bool):
                return float(x)
            if not isinstance(x, tp) or (tp is int and isinstance(x, bool)):
                raise TypeError
            return x

        try:
            out[key] = [one(x) for x in value] if is_list and isinstance(value, list) else one(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            kind = f"a list of {tp.__name__}" if is_list else getattr(tp, "__name__", str(tp))
            raise ValueError(f"{key} in {source} must be {kind}, got {value!r}") from None
    return out


def from_dict(cls: type[C], values: dict, source: str = "config") -> C:
    """Build ``cls`` from a dict (a config file's values are converted to the field types); an old
    field name (:data:`ALIASES`, e.g. in a run's saved config) is read as its new one; an unknown
    key is a clear error listing the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    clean, _ = rename_aliases(cls, {k.replace("-", "_"): v for k, v in values.items()}, source)
    unknown = sorted(set(clean) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) in {source}: {', '.join(unknown)}; valid fields: {', '.join(names)}")
    return cls(**_typed(cls, clean, source))


def parse_config(cls: type[C], argv: list[str] | None = None, prog: str | None = None, **defaults: Any) -> C:
    """Parse flags into ``cls``. Precedence: flags > ``--config`` file > ``defaults`` > field defaults;
    a preset given by flag or file (``--loss-type``) comes before ``defaults`` for the fields it sets.

    Validation errors raised by ``cls.__post_init__`` (ValueError) exit with a one-line
    message instead of a traceback. An old name (:data:`ALIASES`) given as a flag, in the file or
    in ``defaults`` works as its new one, with one line on stderr per old name saying so.
    """
    parser = build_parser(cls, prog=prog)
    ns = vars(parser.parse_args(argv))
    given: dict = {}
    cfg_path = ns.pop("config", None)
    try:
        old_in_file = []
        if cfg_path:
            try:
                file = {k.replace("-", "_"): v for k, v in load_file(cfg_path).items()}
            except OSError as e:
                parser.error(f"cannot read --config {cfg_path}: {e}")
            given, old_in_file = rename_aliases(cls, file, cfg_path)
        ns, old_flags = rename_aliases(cls, ns, "the command line", flag=_flag)
        defaults, old_kwargs = rename_aliases(cls, defaults, "the keyword arguments")
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    _notify([f"{_flag(o)} is deprecated: use {_flag(ALIASES[o])}" for o in old_flags]
            + [f"{o} in {cfg_path} is deprecated: use {ALIASES[o]}" for o in old_in_file]
            + [f"{o}= is deprecated: use {ALIASES[o]}=" for o in old_kwargs])
    given.update(ns)
    # a script's defaults yield to what a preset the user asked for sets (``cls.preset_fields``)
    yielding = cls.preset_fields(given) if hasattr(cls, "preset_fields") else set()
    values = {k: v for k, v in defaults.items() if k not in yielding}
    values.update(given)
    try:
        return from_dict(cls, values, source=cfg_path or "defaults")
    except (ValueError, TypeError) as e:  # one line, not the whole usage
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
