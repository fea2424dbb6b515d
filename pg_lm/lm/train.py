"""``pg-lm lm``: train a causal LM on a built-in task from the command line, or
:func:`train` from Python with your own prompts and reward functions."""

from __future__ import annotations

import sys

from pg_lm.run import parse_config

from .config import LMConfig
from .rewards import RewardError


def train(cfg: LMConfig, reward_fns=None, train_dataset=None, eval_dataset=None, reward_weights=None) -> dict:
    """Train and return the summary. Without datasets/rewards the built-in ``cfg.task`` is used."""
    from pg_lm.tasks import TASKS

    from .trainer import Trainer

    if train_dataset is None or reward_fns is None:
        task_train, task_eval, task_rewards = TASKS[cfg.task](num_eval=cfg.eval_size, seed=0)
        train_dataset = task_train if train_dataset is None else train_dataset
        eval_dataset = task_eval if eval_dataset is None else eval_dataset
        reward_fns = task_rewards if reward_fns is None else reward_fns
    return Trainer(cfg, reward_fns, train_dataset, eval_dataset, reward_weights).train()


def run_cli(argv: list[str] | None, prog: str, fn, **defaults) -> int:
    """Parse flags into an LMConfig, check the launch, apply the CPU layer's process settings when
    it runs, call ``fn(cfg)``; user errors become one line on stderr, exit 2; a run stopped by
    non-finite values exits 1, one stopped by SIGINT / SIGTERM (after saving) 130 / 143."""
    from pg_lm.run.signals import Interrupted

    from .cpu.process import apply_process_settings
    from .setup import plan
    from .trainer import NonFiniteError

    cfg = parse_config(LMConfig, argv, prog=prog, **defaults)
    try:

        if plan(cfg).cpu_layer:  # before any model is loaded: a launch that cannot run stops here
            apply_process_settings()
        fn(cfg)
    except (ValueError, RewardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, "pg-lm lm", train)


if __name__ == "__main__":
    sys.exit(main())
