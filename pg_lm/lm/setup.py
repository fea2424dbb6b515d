"""Building a trainer's parts: accelerator, policy (+LoRA, +value head), reference, optimizer, writer.

Accelerate places everything. On a machine without a GPU, ``Accelerator(cpu=True)``
is required: under ``accelerate launch`` / ``torchrun`` a plain ``Accelerator()``
there silently runs independent single-process jobs instead of one gloo group.
"""

from __future__ import annotations

import copy
import math
import time

import torch

if torch.distributed.is_available():
    # Imported before any process group exists, on purpose: this module binds ``group.WORLD`` as the
    # default argument of its functions when it is first imported, and DDP imports it (through
    # torch.distributed._shard). Imported later, it would hold the process group for good, and
    # Trainer.end() could not free it (see there).
    import torch.distributed.nn.functional  # noqa: F401

from pg_lm.run import RunWriter, to_dict
from pg_lm.run.perf import tune_malloc

from .checkpoint import checkpoint_dir, load_trainer_state, recover_checkpoint, trim_logs
from .lowp import SamplerCopy, cpu_bf16_is_fast, use_grouped_attention
from .policy import load_policy


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kw = {}
    if cfg.report_to != "none":
        kw.update(log_with=cfg.report_to, project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/logs"))
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=resolve_precision(cfg.mixed_precision), **kw)


def resolve_precision(mode: str) -> str:
    """``auto`` -> ``bf16`` only where bf16 matmuls are fast: a CUDA GPU with bf16, or a CPU where
    a bf16 matmul, timed at start-up, takes under 0.6 of the fp32 one (``lowp.cpu_bf16_is_fast``:
    4-5x faster on an AMD EPYC with AVX512-BF16; half as fast on an Intel Xeon with AVX512-BF16
    but no AMX)."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_is_fast() else "no"


def resolve_attention(mode: str, mixed_precision: str, device) -> bool:
    """Whether to run :func:`lowp.grouped_attention`: ``grouped``, or ``auto`` on a CPU in bf16/fp16."""
    return mode == "grouped" or (mode == "auto" and torch.device(device).type == "cpu"
                                 and mixed_precision in ("bf16", "fp16"))


def _optimizer(params, cfg):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:  # the fused kernel is much faster on CPU and GPU alike; not every build has it
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


def lr_factor(schedule: str, progress: float, step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier for training step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` steps, then ``constant`` 1, or ``linear`` / ``cosine`` decay to 0 as
    ``progress`` (0..1, how far the run is: ``Trainer.progress``) goes."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build(trainer) -> None:
    """Fill ``trainer`` with acc, tok, policy, ref, params, opt, sched, writer (resuming if asked)."""
    from accelerate.utils import set_seed

    cfg = trainer.cfg
    tune_malloc()
    trainer.acc = acc = make_accelerator(cfg)
    set_seed(cfg.seed + acc.process_index, device_specific=False)
    if cfg.resume and acc.is_main_process:
        recover_checkpoint(cfg.output_dir)
    acc.wait_for_everyone()
    resume = checkpoint_dir(cfg.output_dir) if cfg.resume else None
    if resume is not None and not (resume / "trainer_state.pt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {resume}")
    policy, trainer.tok = load_policy(
        cfg.model, value_head=cfg.uses_value_head, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
        resume_dir=str(resume) if resume else None,
    )
    grouped = resolve_attention(cfg.attention, acc.mixed_precision, acc.device) and use_grouped_attention(policy.lm)
    trainer.ref = None
    if (cfg.kl_coef > 0) and cfg.lora_r == 0:  # LoRA uses the base with the adapter disabled instead
        # the reference is the model the run started from: a resumed policy is not it
        ref = copy.deepcopy(policy) if resume is None else load_policy(cfg.model)[0]
        ref.value_head = None
        ref.requires_grad_(False)
        trainer.ref = acc.prepare_model(ref.eval(), evaluation_mode=True)
    trainer.params = [p for p in policy.parameters() if p.requires_grad]
    opt = _optimizer(trainer.params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda _: lr_factor(cfg.lr_schedule, trainer.progress(), trainer.step, cfg.warmup_steps))
    trainer.policy, trainer.opt, trainer.sched = acc.prepare(policy, opt, sched)
    trainer.resumed_summary, trainer.prior_wall_s = {}, 0.0
    if resume is not None:
        load_trainer_state(trainer, resume)
        if acc.is_main_process:  # rows logged after the checkpoint describe steps that are redone now
            trim_logs(cfg.output_dir, trainer.step)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    # made after the weights are final (resumed): sampling and evaluation read it (Trainer.sampling_lm)
    trainer.sampler = SamplerCopy(acc.unwrap_model(trainer.policy).lm, low) if low and cfg.sampler_copy else None
    # each parameter's name in the (possibly DDP-wrapped) policy, for forwards that take weights from the copy
    trainer._param_names = {id(p): n for n, p in trainer.policy.named_parameters(remove_duplicate=False)}
    trainer.writer = RunWriter(cfg.output_dir, enabled=acc.is_main_process,
                               trackers=acc.log if cfg.report_to != "none" else None, resume=resume is not None)
    if cfg.report_to != "none":
        acc.init_trackers("pg_lm", config={k: str(v) for k, v in to_dict(cfg).items()})
    trainer.writer.write_json("config.json", {**to_dict(cfg), "num_processes": acc.num_processes,
                                              "resolved_mixed_precision": acc.mixed_precision,
                                              "resolved_attention": "grouped" if grouped else "model"})
    t0 = time.perf_counter()
    trainer.elapsed = lambda: time.perf_counter() - t0 + trainer.prior_wall_s
