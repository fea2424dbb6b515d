"""``pg-lm variance``: the gradient variance of each advantage estimator, measured at a fixed policy.

    pg-lm variance --model smollm2-135m-instruct --task arithmetic --batches 32
    pg-lm variance --adapter runs/lm/checkpoint-last --batches 32    # what a run trained

The trainer is built as ``pg-lm lm`` builds it (same flags); K batches are drawn with its own
rollout (``Trainer.rollout``), and on each batch every estimator of :data:`ESTIMATORS` gets its
advantages from the trainer (pg_lm/lm/estimate.py) and its loss from the trainer's loss code
(``Trainer.rollout_loss``): the gradient over the trainable parameters (the LoRA adapter, or all
weights with ``--lora-r 0``; the value head left out) is the one a training step would take, before
clipping. The moments, the table, ``variance.json`` and ``variance.png``: pg_lm/run/variance.py.
Nothing is trained: the policy stays as loaded.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

from pg_lm.run import parse_config
from pg_lm.run.config import arg

from .config import LMConfig
from .presets import record_explicit
from .rewards import RewardError


@dataclass(frozen=True)
class Estimator:
    """One row of the table: the training flags that give this estimator."""

    estimator: str  # --estimator
    baseline: str  # --baseline
    scale_rewards: bool = False  # --scale-rewards
    # the --baseline the trainer must be built with for its rollout to hold what this estimator needs
    # beyond the samples and a value head (e.g. a baseline that decodes extra completions), else None
    rollout_baseline: str | None = None
    credit: str | None = None  # --credit: an estimator of episodes of many turns (--env), else None
    turn_baseline: str = "episode"  # --turn-baseline (--credit turn)

    @property
    def uses_value_head(self) -> bool:
        return self.estimator == "gae" or self.baseline == "value" or self.credit == "gae"


# name -> flags; a new baseline of the trainer is one more line here
ESTIMATORS: dict[str, Estimator] = {
    "none": Estimator("reinforce", "none"),
    "batch_mean": Estimator("reinforce", "batch_mean"),
    "group_mean": Estimator("reinforce", "group_mean"),
    "group_mean_std": Estimator("reinforce", "group_mean", scale_rewards=True),
    "loo": Estimator("reinforce", "loo"),
    "value": Estimator("reinforce", "value"),
    "gae": Estimator("gae", "value"),
    # ReMax's rollout holds a greedy completion per prompt and no value head: measured in a run of its own
    "remax": Estimator("reinforce", "remax", rollout_baseline="remax"),
}
# episodes of many turns (--env): the credit modes, each over RLOO's leave-one-out baseline
ESTIMATORS.update({
    "episode": Estimator("reinforce", "loo", credit="episode"),
    "turn": Estimator("reinforce", "loo", credit="turn"),
    "turn_index": Estimator("reinforce", "loo", credit="turn", turn_baseline="turn_index"),
    "turn_gae": Estimator("reinforce", "loo", credit="gae"),
})
# what an empty --estimators measures: every estimator one rollout can serve (with --env: every credit mode)
DEFAULT_ESTIMATORS = [n for n, e in ESTIMATORS.items() if e.rollout_baseline is None and e.credit is None]
EPISODE_ESTIMATORS = [n for n, e in ESTIMATORS.items() if e.credit is not None]


@record_explicit
@dataclass
class VarianceConfig(LMConfig):
    """Measure the gradient variance of each advantage estimator at a fixed policy (the model, or what
    a run trained): K batches, every estimator's gradient from the same samples (docs/variance.md)."""

    batches: int = arg(16, "K: independent batches drawn at the fixed policy (>= 2)")
    estimators: list[str] = arg([], "estimators to compare (empty = all but remax, which needs a rollout of its own: "
                                "--estimators remax none loo ...)", tuple(ESTIMATORS))
    reference: str | None = arg(None, "estimator of the large-batch reference gradient (None = loo; with --env, "
                                "episode)", tuple(ESTIMATORS))
    reference_batches: int = arg(16, "further batches averaged into the reference gradient (0 = no cosine)")
    adapter: str | None = arg(None, "a LoRA adapter merged into --model first: RUN_DIR/checkpoint-last, or the run folder")
    output_dir: str = arg("runs/variance", "where variance.json and variance.png go")

    def __post_init__(self):
        if self.reference is None:
            self.reference = "episode" if self.env is not None else "loo"
        super().__post_init__()
        chosen = sorted({"estimator", "baseline", "scale_rewards", "loss_type", "credit", "turn_baseline"}
                        & getattr(self, "_explicit", set()))
        if chosen:
            raise ValueError(f"--{chosen[0].replace('_', '-')}: pg-lm variance compares estimators; name them "
                             f"with --estimators ({', '.join(ESTIMATORS)})")
        if self.batches < 2:
            raise ValueError(f"--batches must be >= 2 (a variance needs two estimates), got {self.batches}")
        if self.reference_batches < 0:
            raise ValueError(f"--reference-batches must be >= 0, got {self.reference_batches}")
        used = {*self.names, *([self.reference] if self.reference_batches else [])}
        episodic = {n for n in used if ESTIMATORS[n].credit is not None}
        if episodic != (used if self.env is not None else set()):
            apart = sorted(used - episodic) if self.env is not None else sorted(episodic)
            raise ValueError(f"--estimators / --reference {', '.join(apart)}: with --env compare the credit modes "
                             f"({', '.join(EPISODE_ESTIMATORS)}), without it the single-completion estimators")
        if self.samples_per_prompt < 2 and {"group_mean", "group_mean_std", "loo"} & used:
            raise ValueError("the group baselines (group_mean, group_mean_std, loo; also as --reference) need "
                             "--samples-per-prompt >= 2")

    @property
    def names(self) -> list[str]:
        default = EPISODE_ESTIMATORS if self.env is not None else DEFAULT_ESTIMATORS
        return list(dict.fromkeys(self.estimators or default))


def policy_params(trainer) -> list[Tensor]:
    """The trainable parameters whose gradient is measured: the policy's, not the value head's."""
    return [p for n, p in trainer.policy.named_parameters() if p.requires_grad and "value_head" not in n]


def policy_gradients(trainer, batch, names: list[str]) -> dict[str, Tensor]:
    """{estimator: the gradient (P,) of its loss on ``batch``} over the trainer's trainable parameters
    (the value head's left out: the policy gradient alone). ``batch`` is a ``Trainer.rollout`` one."""
    params = policy_params(trainer)
    trainer.policy.train()  # as update() runs it
    out = {}
    for name in names:
        est = ESTIMATORS[name]
        adv, _ = trainer.advantages(batch, est.estimator, est.baseline, est.scale_rewards, est.credit, est.turn_baseline)
        loss = trainer.rollout_loss(batch, adv)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]).double()  # (P,)
    return out


def trainer_baseline(names: list[str]) -> str:
    """The ``--baseline`` the trainer is built with, so that one rollout serves every estimator in
    ``names``: ``value`` when one needs a value head, an estimator's ``rollout_baseline`` when its
    rollout differs, else ``none``. Estimators needing different rollouts are a ``ValueError``."""
    ests = [ESTIMATORS[n] for n in dict.fromkeys(names)]
    needs = {e.rollout_baseline for e in ests if e.rollout_baseline}
    needs |= {"value"} if any(e.uses_value_head for e in ests) else set()
    if len(needs) > 1:
        apart = [n for n in dict.fromkeys(names) if ESTIMATORS[n].rollout_baseline or ESTIMATORS[n].uses_value_head]
        raise ValueError(f"--estimators {', '.join(apart)} need different rollouts "
                         f"(--baseline {' / '.join(sorted(needs))}): measure them in separate runs")
    return needs.pop() if needs else "none"


def _model_to_load(cfg: VarianceConfig, tmp: str) -> str:
    """``--model``, or ``--adapter`` merged into its base (written to ``tmp``), or a run folder's checkpoint."""
    from pathlib import Path

    from .export import export, find_checkpoint, is_adapter

    if cfg.adapter:
        ckpt = find_checkpoint(cfg.adapter, "--adapter")
        if not is_adapter(ckpt):
            raise ValueError(f"--adapter {cfg.adapter} holds a full model, not a LoRA adapter: pass it as --model")
        base = cfg.model if "model" in cfg._explicit else None  # else the base the run trained
        return str(export(str(ckpt), f"{tmp}/merged", base))
    if Path(cfg.model).expanduser().is_dir():  # a model folder, a checkpoint, or a run folder's checkpoint-last
        return str(find_checkpoint(cfg.model, "--model"))
    return cfg.model  # a name or a .gguf file: resolved (or refused in one line) as pg-lm lm does


def run_variance(cfg: VarianceConfig, progress=None, reward_fns=None, train_dataset=None,
                 reward_weights=None) -> tuple[dict, str]:
    """Measure as ``cfg`` says; returns (the JSON written, the markdown table). Prompts and rewards
    not passed in come from the flags, as for :func:`pg_lm.lm.train.train`."""
    from pg_lm.run.variance import measure, write_report

    from .data import datasets_from_config
    from .reward_specs import rewards_from_config
    from .train import prompts_and_rewards
    from .trainer import Trainer

    names = cfg.names
    measured = [*names, cfg.reference] if cfg.reference_batches else names
    # bad input stops here, before any model loads
    if cfg.env is not None:  # episodes: the environment rewards (reward functions, if any, add a final reward)
        train_ds = train_dataset if train_dataset is not None or not cfg.dataset else datasets_from_config(cfg)[0]
        fns, weights = (reward_fns, reward_weights) if reward_fns is not None else rewards_from_config(cfg)
        rollout = {"baseline": "loo", "credit": "gae" if any(ESTIMATORS[n].uses_value_head for n in measured)
                   else "episode"}
    else:
        train_ds, _, fns, weights = prompts_and_rewards(cfg, reward_fns, train_dataset, None, reward_weights)
        rollout = {"baseline": trainer_baseline(measured)}
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_to_load(cfg, tmp)
        fields = {f.name for f in dataclasses.fields(LMConfig)}
        base = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
        tcfg = LMConfig(**{**base, "model": model, "loss_type": None, "estimator": "reinforce", **rollout,
                           "scale_rewards": False,
                           "output_dir": f"{tmp}/trainer", "save_model": False, "progress": False, "resume": False,
                           "report_to": "none"})
        trainer = Trainer(tcfg, fns or [], train_ds, None, weights)
        if trainer.acc.num_processes > 1:
            raise ValueError("pg-lm variance runs in one process (launch it without accelerate launch / torchrun)")
        rewards: list[float] = []

        def draw(i: int):
            batch, stats = trainer.rollout(step=i)  # the prompts of step i: every batch draws its own
            rewards.append(float(stats["reward/mean"]))
            return batch

        results = measure(draw, lambda b, n: policy_gradients(trainer, b, n), names, cfg.batches, cfg.reference,
                          cfg.reference_batches, progress)
        n_params = sum(p.numel() for p in policy_params(trainer))
    meta = {"backend": "lm", "model": cfg.model, "adapter": cfg.adapter, "env": cfg.env,
            "task": None if cfg.dataset or cfg.env else cfg.task, "max_turns": cfg.max_turns if cfg.env else None,
            "dataset": cfg.dataset, "batches": cfg.batches, "reference": cfg.reference,
            "reference_batches": cfg.reference_batches, "prompts_per_step": cfg.prompts_per_step,
            "samples_per_prompt": cfg.samples_per_prompt, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "lora_r": cfg.lora_r, "trainable_params": n_params, "seed": cfg.seed,
            "reward_mean": sum(rewards) / len(rewards),
            "estimators": {n: dataclasses.asdict(ESTIMATORS[n]) for n in names}}
    title = f"gradient variance at a fixed policy: {cfg.adapter or cfg.model}, K={cfg.batches}"
    table = write_report(results, meta, cfg.output_dir, title)
    return {**meta, "results": results}, table


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(VarianceConfig, argv, prog="pg-lm variance")
    try:
        _, table = run_variance(cfg, progress=(lambda s: print(s, file=sys.stderr)) if cfg.progress else None)
    except (ValueError, RewardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\n(variance.json and variance.png in {cfg.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
