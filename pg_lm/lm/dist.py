"""Every reduction over a run's processes in one place, FSDP2's whole-weights context, and the model
sampling runs on.

The language-model trainer needs a handful of collectives: global token counts for the loss
denominators, the largest count over processes (so that every process runs the same number of
micro-batches or sampling rounds), the step's scalars averaged, one agreed answer to "did any
process see a non-finite value" or "was a signal caught". With one process each is the identity
(no collective is issued), so the single-process path never depends on a process group.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor


class Collective:
    """Reductions over the processes of ``acc`` (an ``accelerate.Accelerator``)."""

    def __init__(self, acc):
        self.acc = acc
        self.world = acc.num_processes

    def reduce(self, t: Tensor, op: str) -> Tensor:
        """``t`` reduced elementwise over every process by ``op``: "sum", "mean", "max" or "min"."""
        if self.world == 1:
            return t
        if op == "min":
            return -self.acc.reduce(-t, "max")
        return self.acc.reduce(t, op)

    def sum(self, x) -> float:
        """The sum over processes of a number or a one-element tensor, as a float."""
        return float(self.reduce(torch.as_tensor(x, dtype=torch.float32, device=self.acc.device).reshape(1), "sum"))

    def max(self, x) -> float:
        """The largest value over processes of a number or a one-element tensor, as a float."""
        return float(self.reduce(torch.as_tensor(x, dtype=torch.float32, device=self.acc.device).reshape(1), "max"))

    def whiten_reduce(self):
        """The ``reduce(t, op)`` that :func:`pg_lm.core.masked_whiten` takes to whiten over every
        process's tokens, or None with one process."""
        return None if self.world == 1 else self.reduce

    def scalars(self, stats: dict) -> dict:
        """Every scalar of ``stats`` as a float, averaged over processes (keys ending in ``_max``:
        the maximum), in one collective per kind."""
        out = {}
        for how in ("mean", "max"):
            keys = sorted(k for k in stats if k.endswith("_max") == (how == "max"))
            if keys:
                vals = self.reduce(torch.tensor([float(stats[k]) for k in keys], device=self.acc.device), how)
                out.update(zip(keys, vals.tolist()))
        return out

    def first(self, names: tuple[str, ...], name: str | None) -> str | None:
        """The earliest of ``names`` that any process reports (``name`` is this process's, or None),
        so that every process takes the same branch after it."""
        if self.world == 1:
            return name
        code = torch.tensor([names.index(name) if name else len(names)], device=self.acc.device)
        first = int(self.reduce(code, "min"))
        return names[first] if first < len(names) else None


@contextmanager
def full_weights(model):
    """Every FSDP2-sharded module of ``model`` with its whole weights for the duration: all-gathered
    once and kept through every forward (no re-sharding after each), resharded on leaving. Sampling
    then runs the model's forward as on one device, with no collective per decode step, so the
    processes may decode different numbers of steps. Without FSDP2, nothing to do."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    if not sharded:
        yield
        return
    # whether each module reshards after its forward (FSDP2 keeps no public getter for it)
    before = [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
              for m in sharded]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(sharded, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


def sampling_lm(acc, policy, sampler):
    """(the causal LM to sample from, a function making the context to sample in): under the CPU
    layer in bf16/fp16 its sampling copy ``sampler``, with no autocast; else the policy's own LM
    under autocast, with its whole weights (:func:`full_weights`, for FSDP2). A function, not a
    context: ``Accelerator.autocast()`` is a generator context that can be entered only once."""
    if sampler is not None:
        return sampler.lm, nullcontext

    @contextmanager
    def context():
        with full_weights(policy), acc.autocast():
            yield

    return acc.unwrap_model(policy).lm, context
