"""Non-finite values: found, agreed on by every process, the update skipped and counted.

A NaN or inf in any quantity of a step (:data:`QUANTITIES`, in the order they are computed) skips
that step's update -- weights and optimizer state untouched -- and is counted in
``health/skipped_steps``; ``--max-bad-steps`` skipped updates in a row stop the run with
:class:`NonFiniteError`, naming the step and the quantity, and the last checkpoint stays as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the quantities checked for NaN / inf each step, in the order they are computed
QUANTITIES = ("reward", "sampler log-prob", "advantage", "log-prob", "IS weight", "loss", "gradient")


class NonFiniteError(RuntimeError):
    """``--max-bad-steps`` updates in a row were skipped for a non-finite value (named)."""


def nonfinite(named: dict, mask: Tensor) -> str | None:
    """The name of the first (B, T) tensor in ``named`` with a NaN or inf on a real token, or None."""
    m = mask.bool()
    return next((k for k, x in named.items() if x is not None and not bool(torch.isfinite(x[m]).all())), None)


def count(state, bad: str | None, max_bad_steps: int, print_fn=print) -> None:
    """Record in the train ``state`` whether the step under way (``state.step`` + 1) was skipped for
    the non-finite quantity ``bad`` (None: it was not); raise :class:`NonFiniteError` after
    ``max_bad_steps`` skipped in a row."""
    if bad is None:
        state.bad_in_row = 0
        return
    state.skipped_steps += 1
    state.bad_in_row += 1
    step = state.step + 1
    print_fn(f"step {step}: non-finite {bad}; update skipped ({state.bad_in_row} in a row)")
    if state.bad_in_row >= max_bad_steps:
        raise NonFiniteError(f"step {step}: non-finite {bad} ({state.bad_in_row} updates in a row skipped, "
                             f"--max-bad-steps {max_bad_steps}); the last checkpoint is untouched")
