"""Checkpoints in Hugging Face format plus the trainer state that ``--resume`` needs.

``output_dir/checkpoint-last/`` holds the model (``save_pretrained``: the adapter alone
under LoRA), the tokenizer, ``value_head.pt`` when there is a value head, and
``trainer_state.pt`` (step, optimizer, scheduler, KL coefficient, summary so far).
It is written to a temporary folder and swapped in, so a run that dies mid-save
keeps the previous checkpoint. Under FSDP2 every process takes part in gathering the full
model and optimizer state and the main process writes them: the model is an ordinary Hugging
Face checkpoint, and the optimizer state (keyed by parameter name) resumes under FSDP2. Under
DeepSpeed the optimizer state is its engine's, sharded and not saved here: its checkpoints hold
the model, and ``--resume`` is refused at start-up.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

CHECKPOINT = "checkpoint-last"


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT


def recover_checkpoint(output_dir: str) -> Path:
    """``checkpoint-last``, put back from ``checkpoint-last.old`` when a save died between its
    two renames (the previous checkpoint is whole there). Call on the main process only."""
    final = checkpoint_dir(output_dir)
    old = final.with_name(CHECKPOINT + ".old")
    if not final.exists() and (old / "trainer_state.pt").exists():
        old.rename(final)
    return final


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


def save_checkpoint(trainer, summary: dict) -> Path:
    acc = trainer.acc
    final = checkpoint_dir(trainer.cfg.output_dir)
    acc.wait_for_everyone()
    full = acc.get_state_dict(trainer.policy) if _fsdp(acc) else None  # collective: every process gathers
    optimizer = _optimizer_state(trainer)
    if acc.is_main_process:
        tmp, old = final.with_name(CHECKPOINT + ".tmp"), final.with_name(CHECKPOINT + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        policy = acc.unwrap_model(trainer.policy)
        kw = {} if full is None else {"state_dict": _part(full, "lm.")}
        policy.lm.save_pretrained(tmp, safe_serialization=True, **kw)
        trainer.tok.save_pretrained(tmp)
        if policy.value_head is not None:
            head = policy.value_head.state_dict() if full is None else _part(full, "value_head.")
            torch.save(head, tmp / "value_head.pt")
        state = {"step": trainer.step, "optimizer": optimizer, "scheduler": trainer.sched.state_dict(),
                 "kl_coef": trainer.kl_coef, "summary": summary, "wall_s": trainer.elapsed()}
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_trainer_state(trainer, path: Path) -> None:
    """Restore step, optimizer, scheduler and KL coefficient from ``path/trainer_state.pt``."""
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    trainer.step = state["step"]
    if _fsdp(trainer.acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(trainer.policy, trainer.opt.optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif state["optimizer"] is not None:
        trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.kl_coef = state["kl_coef"]
    trainer.resumed_summary = state.get("summary", {})
    trainer.prior_wall_s = state.get("wall_s", 0.0)


def trim_logs(output_dir: str, step: int) -> None:
    """Drop ``metrics.jsonl`` / ``samples.jsonl`` rows after ``step`` (written by a run that died
    before its next checkpoint): a resumed run redoes those steps and logs them again."""
    import json

    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(output_dir) / name
        if not path.exists():
            continue
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        if len(keep) < len(lines):
            tmp = path.with_name(name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)
