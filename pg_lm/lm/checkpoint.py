"""Checkpoints in Hugging Face format plus everything ``--resume`` needs to continue the same run.

A checkpoint folder (``checkpoint-last/``, older ones ``checkpoint-<step>/``; see
:mod:`pg_lm.run.checkpoints`: sealed with checksums, rotated to ``--save-total-limit``) holds
the model (``save_pretrained``: the adapter alone under LoRA), the tokenizer,
``value_head.pt`` when there is a value head, and ``trainer_state.pt``: the optimizer, the
scheduler, the :class:`TrainState` (step, KL coefficient, skipped updates, time spent, summary so
far), the settings the weights depend on (:data:`STRUCTURE`: a run that differs in one is refused
before any model loads) and every process's random generators. The prompt order is a function of
the seed and the step, so the step is the data position. A run resumed from it draws the same prompts, samples
the same completions and ends with the same weights as the run that was never stopped.

Under FSDP2 every process takes part in gathering the full model and optimizer state and the
main process writes them: the model is an ordinary Hugging Face checkpoint, and the optimizer
state (keyed by parameter name) resumes under FSDP2. Under DeepSpeed the optimizer state is its
engine's, sharded and not saved here: its checkpoints hold the model, and ``--resume`` is
refused at start-up.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pg_lm.run.checkpoints import commit, find_resumable, rng_state, set_rng_state

# what a checkpoint must agree with the resuming run on: which weights it holds, their shapes and
# what they mean (a value head exists for the estimators and baselines that learn V). Other flags
# (steps, learning rate, sampling...) may change on resume.
STRUCTURE = ("model", "lora_r", "lora_alpha", "lora_target_modules", "estimator", "baseline", "credit")


@dataclass
class TrainState:
    """What a training run carries from step to step besides the weights and the optimizer: what a
    checkpoint saves and a resumed run restores, and the run's clock."""

    kl_coef: float  # the KL penalty's coefficient (moves under --kl-target)
    step: int = 0  # optimizer rounds (rollouts) done; with the seed it fixes the data position
    skipped_steps: int = 0  # updates skipped for a non-finite value, over the whole run
    bad_in_row: int = 0  # ... of them in a row, up to now (--max-bad-steps)
    no_signal_steps: int = 0  # steps in a row without a learning signal, up to now (--collapse-steps, monitor.py)
    summary: dict = field(default_factory=dict)  # what the run has summarised so far (eval before training)
    prior_wall_s: float = 0.0  # seconds spent by earlier runs of a resumed run
    t0: float = field(default_factory=time.perf_counter)  # when this process's run started

    def elapsed(self) -> float:
        """Seconds of the whole run, earlier runs of a resumed one included."""
        return time.perf_counter() - self.t0 + self.prior_wall_s

    def progress(self, max_steps: int, max_seconds: float | None) -> float:
        """How far the run is, 0..1: steps over ``max_steps``, or time over ``max_seconds`` if further."""
        p = self.step / max_steps
        if max_seconds:
            p = max(p, self.elapsed() / max_seconds)
        return min(p, 1.0)


def structure(cfg) -> dict:
    """The settings of :data:`STRUCTURE` of ``cfg``, as a checkpoint records them."""
    return {k: getattr(cfg, k) for k in STRUCTURE}


def read_state(path: Path, cfg) -> dict:
    """``path/trainer_state.pt``, after checking that it fits ``cfg``: a ``ValueError`` naming, in one
    line, each setting of :data:`STRUCTURE` that differs (checkpoints saved before the record are
    checked against their run's ``config.json`` where it is there)."""
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    saved = state.get("structure")
    if saved is None:
        import json

        try:
            saved = json.loads((path.parent / "config.json").read_text())
        except (OSError, ValueError):
            saved = {}
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} there, {getattr(cfg, k)!r} here" for k in STRUCTURE
            if k in saved and _norm(saved[k]) != _norm(getattr(cfg, k))]
    if diff:
        raise ValueError(f"--resume: {path} does not fit this run ({'; '.join(diff)}): resume with the same "
                         f"settings, or choose another --output-dir")
    return state


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def _optimizer_state(trainer) -> dict | None:
    """The optimizer's state, whole (under FSDP2 gathered from every process: call it on all)."""
    if _deepspeed(trainer.acc):
        return None
    if _fsdp(trainer.acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(trainer.policy, trainer.opt.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return trainer.opt.state_dict()


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _all_rng_states(acc) -> list[dict]:
    """Every process's random generators, in rank order (a collective: call it on all)."""
    if acc.num_processes == 1:
        return [rng_state()]
    from accelerate.utils import gather_object

    return gather_object([rng_state()])


def nonfinite_weight(model) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all():  # (FSDP2: this process's shard)
            return name
    return None


def save_checkpoint(trainer, summary: dict) -> Path:
    """Write ``trainer``'s weights, optimizer and :class:`TrainState` as the newest checkpoint; every
    process must call it. Weights holding a NaN or inf are never written (``ValueError`` naming the
    parameter)."""
    acc, cfg, st = trainer.acc, trainer.cfg, trainer.state
    acc.wait_for_everyone()
    bad = nonfinite_weight(trainer.policy)
    if acc.num_processes > 1:  # every process agrees, so none waits in a collective the others skip
        from accelerate.utils import gather_object

        bad = next((b for b in gather_object([bad]) if b), None)
    if bad is not None:
        raise ValueError(f"not saving step {st.step}: parameter {bad} holds a non-finite value")
    full = acc.get_state_dict(trainer.policy) if _fsdp(acc) else None  # collective: every process gathers
    optimizer = _optimizer_state(trainer)
    rng = _all_rng_states(acc)
    out = Path(cfg.output_dir) / "checkpoint-last"

    def write(folder: Path) -> None:
        policy = acc.unwrap_model(trainer.policy)
        kw = {} if full is None else {"state_dict": _part(full, "lm.")}
        policy.lm.save_pretrained(folder, safe_serialization=True, **kw)
        trainer.tok.save_pretrained(folder)
        if policy.value_head is not None:
            head = policy.value_head.state_dict() if full is None else _part(full, "value_head.")
            torch.save(head, folder / "value_head.pt")
        state = {"step": st.step, "optimizer": optimizer, "scheduler": trainer.sched.state_dict(),
                 "kl_coef": st.kl_coef, "skipped_steps": st.skipped_steps, "bad_in_row": st.bad_in_row,
                 "no_signal_steps": st.no_signal_steps,
                 "summary": summary, "wall_s": st.elapsed(), "rng": rng, "structure": structure(cfg)}
        torch.save(state, folder / "trainer_state.pt")

    if acc.is_main_process:
        out = commit(cfg.output_dir, st.step, write, cfg.save_total_limit)
    acc.wait_for_everyone()
    return out


def resumable(acc, output_dir: str) -> Path:
    """The newest intact checkpoint in ``output_dir``, chosen by the main process for all
    (``FileNotFoundError`` when there is none)."""
    from accelerate.utils import broadcast_object_list

    found = [None]
    if acc.is_main_process:
        try:
            found = [str(find_resumable(output_dir))]
        except FileNotFoundError as e:
            found = [e]
    if acc.num_processes > 1:
        broadcast_object_list(found)
    if isinstance(found[0], Exception):
        raise found[0]
    return Path(found[0])


def load_trainer_state(st: TrainState, acc, policy, opt, sched, state: dict) -> None:
    """Restore everything but the weights (loaded with the model) from a checkpoint's ``state``
    (:func:`read_state`): the train state ``st``, the optimizer ``opt`` of the prepared ``policy``,
    the scheduler, every process's random generators."""
    st.step = state["step"]
    if _fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, opt.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    st.kl_coef = state["kl_coef"]
    st.skipped_steps, st.bad_in_row = state.get("skipped_steps", 0), state.get("bad_in_row", 0)
    st.no_signal_steps = state.get("no_signal_steps", 0)
    st.summary = state.get("summary", {})
    st.prior_wall_s = state.get("wall_s", 0.0)
    rngs, rank = state.get("rng"), acc.process_index
    if rngs is not None and len(rngs) == acc.num_processes:
        set_rng_state(rngs[rank])
    elif rank == 0:
        warnings.warn(f"--resume: the checkpoint was saved by {len(rngs or [])} processes, this run has "
                      f"{acc.num_processes}: random generators are reseeded, so sampling differs "
                      "from the run that was stopped", stacklevel=2)
