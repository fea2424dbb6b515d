"""``--loss-type``: the loss variants under the names people know from TRL, veRL and OpenRLHF.

A preset is a set of pg_lm's own flags. Its *defining* flags make it what it is (GSPO is a
sequence-level ratio; Dr. GRPO does not divide by the group's std): a flag given with the preset
that contradicts one of them is an error naming both. Its *tunable* flags are the paper's values
(the clip range, ...): a flag given with the preset overrides them. Every other flag keeps its
default. The expansion is printed at start-up and saved in ``config.json``; docs/algorithms.md
has the table with each preset's paper and TRL's / veRL's names for the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from pg_lm.run.config import ALIASES


@dataclass(frozen=True)
class Preset:
    paper: str
    defining: dict  # field -> value; a contradicting explicit flag is an error
    tunable: dict = field(default_factory=dict)  # field -> value; an explicit flag wins

    def __post_init__(self):  # a preset written with a field's old name (``lam``) sets the field (``gae_lambda``)
        for part in ("defining", "tunable"):
            object.__setattr__(self, part, {ALIASES.get(k, k): v for k, v in getattr(self, part).items()})


_GROUP = {"estimator": "reinforce", "baseline": "group_mean"}
_CLIP = {"clip_low": 0.2, "clip_high": 0.2}

PRESETS: dict[str, Preset] = {
    "grpo": Preset("Shao et al. 2024, DeepSeekMath",
                   {**_GROUP, "scale_rewards": True, "loss_agg": "seq-mean-token-mean", "ratio_level": "token"}, _CLIP),
    "dr_grpo": Preset("Liu et al. 2025, Understanding R1-Zero-Like Training",
                      {**_GROUP, "scale_rewards": False, "loss_agg": "seq-mean-token-sum-norm", "ratio_level": "token"},
                      _CLIP),
    "dapo": Preset("Yu et al. 2025, DAPO",
                   {**_GROUP, "scale_rewards": True, "loss_agg": "token-mean", "ratio_level": "token",
                    "dynamic_sampling": True}, {"clip_low": 0.2, "clip_high": 0.28}),
    "bnpo": Preset("TRL's token-level normalisation without DAPO's other parts",
                   {**_GROUP, "scale_rewards": True, "loss_agg": "token-mean", "ratio_level": "token"}, _CLIP),
    "gspo": Preset("Zheng et al. 2025, Group Sequence Policy Optimization",
                   {**_GROUP, "scale_rewards": True, "loss_agg": "seq-mean-token-mean", "ratio_level": "sequence"},
                   {"clip_low": 3e-4, "clip_high": 4e-4}),
    "rloo": Preset("Ahmadian et al. 2024, Back to Basics",
                   {"estimator": "reinforce", "baseline": "loo", "scale_rewards": False, "ratio_level": "token"},
                   {"kl_in": "reward", "kl_estimator": "k1"}),
    "reinforce_pp": Preset("Hu 2025, REINFORCE++",
                           {"estimator": "reinforce", "baseline": "none", "whiten_advantages": True,
                            "ratio_level": "token"}, {**_CLIP, "kl_in": "reward", "kl_estimator": "k1"}),
    "reinforce_pp_baseline": Preset("Hu 2025, REINFORCE++ (-baseline)",
                                    {**_GROUP, "scale_rewards": False, "whiten_advantages": True,
                                     "ratio_level": "token"}, {**_CLIP, "kl_in": "loss", "kl_estimator": "k2"}),
}


def flag(name: str, value) -> str:
    """``--name value`` as typed on the command line."""
    v = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return f"--{name.replace('_', '-')} {v}"


def record_explicit(cls):
    """Make ``cls.__init__`` record the names of the fields its caller gave (``_explicit``), so that
    a preset can tell a flag the user gave from a field left at its default. The CLI and config
    files build the config from the given values only (:func:`pg_lm.run.config.from_dict`)."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_explicit", frozenset(names[: len(args)]) | frozenset(kwargs))
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def apply_preset(cfg) -> None:
    """Set ``cfg``'s fields from its ``loss_type`` preset (called first in ``__post_init__``); a given
    field contradicting a defining value is a ``ValueError`` naming both."""
    preset = PRESETS[cfg.loss_type]
    given = getattr(cfg, "_explicit", frozenset())
    for name, value in preset.defining.items():
        if name in given and getattr(cfg, name) != value:
            raise ValueError(f"--loss-type {cfg.loss_type} sets {flag(name, value)}; {flag(name, getattr(cfg, name))} "
                             "contradicts it (drop one of the two)")
        setattr(cfg, name, value)
    for name, value in preset.tunable.items():
        if name not in given:
            setattr(cfg, name, value)


def describe(cfg) -> dict | None:
    """``config.json``'s record of the preset: its flags and the tunable ones given otherwise; None without one."""
    if cfg.loss_type is None:
        return None
    preset = PRESETS[cfg.loss_type]
    sets = {**preset.defining, **preset.tunable}
    return {"loss_type": cfg.loss_type, "paper": preset.paper, "sets": sets,
            "overridden": {k: getattr(cfg, k) for k, v in sets.items() if getattr(cfg, k) != v}}


def summary_line(cfg) -> str | None:
    """One line for the console: what ``--loss-type`` expanded to."""
    d = describe(cfg)
    if d is None:
        return None
    line = f"--loss-type {cfg.loss_type} ({d['paper']}): " + " ".join(flag(k, v) for k, v in d["sets"].items())
    if d["overridden"]:
        line += "; overridden: " + " ".join(flag(k, v) for k, v in d["overridden"].items())
    return line
