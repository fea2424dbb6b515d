"""Building a trainer's parts: accelerator, policy (+LoRA, +value head), reference, optimizer, writer.

Accelerate places everything: one device, DDP, FSDP2 or DeepSpeed, as ``accelerate launch``
configures it (``configs/accelerate/``). :func:`plan` checks the launch against the config before
any model is loaded. On a machine without a GPU, ``Accelerator(cpu=True)`` is required: under
``accelerate launch`` / ``torchrun`` a plain ``Accelerator()`` there silently runs independent
single-process jobs instead of one gloo group.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

if torch.distributed.is_available():
    # Imported before any process group exists, on purpose: this module binds ``group.WORLD`` as the
    # default argument of its functions when it is first imported, and DDP imports it (through
    # torch.distributed._shard). Imported later, it would hold the process group for good, and
    # Trainer.end() could not free it (see there).
    import torch.distributed.nn.functional  # noqa: F401

from pg_lm.run import RunWriter, to_dict, trim_logs
from pg_lm.run.checkpoints import clear

from . import cpu
from .checkpoint import TrainState, load_trainer_state, read_state, resumable
from .policy import load_policy
from .presets import describe, summary_line


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class Plan:
    """Where and how a run executes, decided before any model is loaded."""

    device_type: str  # "cuda" or "cpu"
    sharding: str | None  # "fsdp" (FSDP2) or "deepspeed" when ``accelerate launch`` asked for it, else None
    cpu_layer: bool  # whether pg_lm/lm/cpu runs (cpu.resolve)


def plan(cfg) -> Plan:
    """The run's device, sharding and CPU layer; a combination that cannot run is a ``ValueError``
    naming the flag (the CLI prints it in one line and exits 2)."""
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cuda else "cpu"
    sharding = "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else "deepspeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else None
    if cfg.mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("--mixed-precision bf16: this GPU has no bf16 support; use --mixed-precision fp16 or no")
    if cfg.mixed_precision == "fp16" and not cuda:
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    if sharding == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("pg_lm runs FSDP version 2 only: set fsdp_version: 2 in the Accelerate config "
                         "(configs/accelerate/fsdp2.yaml)")
    if sharding == "deepspeed" and not cuda:
        raise ValueError("DeepSpeed needs a CUDA GPU; on a CPU launch with configs/accelerate/cpu_ddp.yaml")
    if sharding == "deepspeed" and (cfg.micro_batch_size or cfg.minibatch_rows) < cfg.minibatch_rows:
        raise ValueError("--micro-batch-size: gradient accumulation over micro-batches is not supported under "
                         "DeepSpeed (its engine steps at every backward); leave it unset")
    if sharding is not None and cfg.update == "trpo":
        raise ValueError(f"--update trpo needs every process to hold the whole weights (DDP or one process); "
                         f"this launch shards them ({sharding})")
    if sharding == "deepspeed" and cfg.resume:
        raise ValueError("--resume is not supported under DeepSpeed (its optimizer state is not saved); "
                         "launch with configs/accelerate/fsdp2.yaml or ddp.yaml to resume")
    return Plan(device_type, sharding, cpu.resolve(cfg.cpu_layer, device_type, sharded=sharding is not None))


def make_accelerator(cfg, run: Plan):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration

    kw = {}
    if cfg.report_to != "none":
        kw.update(log_with=cfg.report_to, project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/logs"))
    precision = resolve_precision(cfg.mixed_precision, cfg.output_dir if cfg.resume else None)
    plugin = FullyShardedDataParallelPlugin() if run.sharding == "fsdp" else None  # read from the launch's env
    acc = Accelerator(cpu=run.device_type == "cpu", mixed_precision=precision, fsdp_plugin=plugin, **kw)
    if plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns an FSDP launch on CPUs into plain DDP over gloo; FSDP2 itself runs there
        # (fully_shard over gloo), so the state is set to what the launch asked for
        if precision != "no":
            plugin.set_mixed_precision(precision)
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if run.sharding == "deepspeed":  # what a DeepSpeed config would otherwise read from a dataloader
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.minibatch_rows
        ds["gradient_clipping"] = cfg.max_grad_norm or 0.0
        ds["gradient_accumulation_steps"] = 1
    return acc


def resolve_precision(mode: str, resumed_dir: str | None = None) -> str:
    """``auto`` -> ``bf16`` only where bf16 matmuls are fast: a CUDA GPU with bf16, or a CPU where
    a bf16 matmul, timed at start-up, takes under 0.6 of the fp32 one (``cpu.lowp.cpu_bf16_is_fast``:
    the CPU's feature flags do not tell). The timing is the main process's, shared with the others
    (a loaded machine could time differently in each). A resumed run (``resumed_dir``) keeps the
    precision its ``config.json`` recorded: a timing that came out otherwise would change the run."""
    if mode != "auto":
        return mode
    if resumed_dir is not None:
        try:
            return json.loads((Path(resumed_dir) / "config.json").read_text())["resolved_mixed_precision"]
        except (OSError, ValueError, KeyError):
            pass  # no record: decide as a fresh run would
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from .cpu.lowp import cpu_bf16_is_fast

    state = PartialState(cpu=True)
    choice = [("bf16" if cpu_bf16_is_fast() else "no") if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice)
    return choice[0]


def cpu_layer_record(mode: str, run: Plan, lm, grouped: bool, sampler) -> dict:
    """What of the CPU layer runs (``config.json``'s ``cpu_layer``, with the flag's ``mode``)."""
    from .cpu.decode_llama import supports
    from .cpu.process import applied

    on = run.cpu_layer
    return {"mode": mode, "enabled": on, "decode": "llama" if on and supports(lm) else "model", "decode_gemm": on,
            "attention": "grouped" if grouped else "model", "sampler_copy": sampler is not None,
            "process_settings": applied()}


def _optimizer(params, cfg):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:  # the fused kernel is much faster on CPU and GPU alike; not every build has it
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kw)


def lr_factor(schedule: str, progress: float, step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier for training step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` steps, then ``constant`` 1, or ``linear`` / ``cosine`` decay to 0 as
    ``progress`` (0..1, how far the run is: ``TrainState.progress``) goes."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class Parts:
    """What a language-model run trains with, made by :func:`build`."""

    acc: object  # the accelerate.Accelerator: device, precision, processes
    tok: object  # the tokenizer
    policy: torch.nn.Module  # pg_lm.lm.policy.Policy (LM + LoRA + value head), prepared by Accelerate
    ref: torch.nn.Module | None  # the frozen reference for the KL (None: none, or LoRA's base is it)
    params: list  # the trainable parameters (under FSDP2 the sharded ones)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    writer: RunWriter  # the run folder's outputs
    cpu_layer: bool  # whether pg_lm/lm/cpu runs (cpu.resolve)
    sampler: object | None = None  # the CPU layer's low-precision sampling copy (cpu.lowp.SamplerCopy)
    param_names: dict = field(default_factory=dict)  # id(parameter) -> name in the policy, for the copy


def build(cfg) -> tuple[Parts, TrainState]:
    """The run's parts and its train state, resumed from the newest checkpoint when ``cfg.resume``
    (a checkpoint that does not fit the config is refused before any model loads)."""
    from accelerate.utils import set_seed

    run = plan(cfg)  # before any model is loaded: a launch that cannot run fails here
    if cfg.update == "trpo":  # without a value head AdamW never steps; the schedule still counts the steps
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
    acc = make_accelerator(cfg, run)
    set_seed(cfg.seed + acc.process_index, device_specific=False)
    resume = resumable(acc, cfg.output_dir) if cfg.resume else None  # the newest intact checkpoint
    saved = read_state(resume, cfg) if resume is not None else None
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
    policy, tok, ref, grouped = _models(cfg, acc, resume, run.cpu_layer and low is not None)
    state = TrainState(kl_coef=cfg.kl_coef)
    opt = _optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor(
        cfg.lr_schedule, state.progress(cfg.max_steps, cfg.max_seconds), state.step, cfg.warmup_steps))
    # one call: FSDP2 shards the model and points the optimizer at the sharded parameters together
    policy, opt, sched = acc.prepare(policy, opt, sched)
    parts = Parts(acc, tok, policy, ref, [p for p in policy.parameters() if p.requires_grad], opt, sched, None,
                  run.cpu_layer)
    if saved is not None:  # after loading the models, which draw from the generators it restores
        load_trainer_state(state, acc, policy, opt, sched, saved)
        if acc.is_main_process:  # rows logged after the checkpoint describe steps that are redone now
            trim_logs(cfg.output_dir, state.step)
    if run.cpu_layer and low is not None:
        from .cpu.lowp import SamplerCopy

        # made after the weights are final (resumed): sampling and evaluation read it (Trainer.sampling_lm)
        parts.sampler = SamplerCopy(acc.unwrap_model(policy).lm, low)
        # each parameter's name in the (possibly DDP-wrapped) policy, for forwards that take weights from the copy
        parts.param_names = {id(p): n for n, p in policy.named_parameters(remove_duplicate=False)}
    if resume is None and acc.is_main_process and (n := clear(cfg.output_dir)):
        acc.print(f"starting over in {cfg.output_dir}: removed {n} checkpoint(s) of an earlier run (--resume continues one)")
    record = cpu_layer_record(cfg.cpu_layer, run, acc.unwrap_model(policy).lm, grouped, parts.sampler)
    parts.writer = _writer(cfg, acc, resume is not None, record)
    state.t0 = time.perf_counter()
    return parts, state


def _models(cfg, acc, resume, lowp_cpu: bool):
    """(the policy, the tokenizer, the prepared frozen reference or None, whether attention runs
    grouped): the policy from ``resume``'s weights when resuming; the reference is always the model
    the run started from. ``lowp_cpu``: the CPU layer in bf16 / fp16 (grouped attention, cpu.lowp)."""
    policy, tok = load_policy(
        cfg.model, value_head=cfg.uses_value_head, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
        resume_dir=str(resume) if resume else None,
    )
    grouped = False
    if lowp_cpu:
        from .cpu.lowp import use_grouped_attention

        grouped = use_grouped_attention(policy.lm)
    if not (cfg.kl_coef > 0 and cfg.lora_r == 0):  # LoRA uses the base with the adapter disabled instead
        return policy, tok, None, grouped
    # the reference is the model the run started from: a resumed policy is not it
    ref = copy.deepcopy(policy) if resume is None else load_policy(cfg.model)[0]
    ref.value_head = None
    ref.requires_grad_(False)
    return policy, tok, acc.prepare_model(ref.eval(), evaluation_mode=True), grouped


def _writer(cfg, acc, resumed: bool, cpu_layer: dict) -> RunWriter:
    """The run folder's writer (and the trackers), with ``config.json`` written."""
    writer = RunWriter(cfg.output_dir, enabled=acc.is_main_process,
                       trackers=acc.log if cfg.report_to != "none" else None, resume=resumed)
    if cfg.report_to != "none":
        acc.init_trackers("pg_lm", config={k: str(v) for k, v in to_dict(cfg).items()})
    writer.write_json("config.json", {**to_dict(cfg), "num_processes": acc.num_processes,
                                      "distributed_type": str(acc.distributed_type).split(".")[-1],
                                      "resolved_mixed_precision": acc.mixed_precision,
                                      "cpu_layer": cpu_layer, "preset": describe(cfg)})
    if cfg.loss_type is not None:
        acc.print(summary_line(cfg))
    return writer
