"""``pg-lm lm``: train a causal LM on a built-in task or your own dataset and reward functions
from the command line, or :func:`train` from Python with your own prompts and reward functions."""

from __future__ import annotations

import sys

from pg_lm.run import parse_config

from .config import LMConfig
from .rewards import RewardError


def prompts_and_rewards(cfg, reward_fns=None, train_dataset=None, eval_dataset=None, reward_weights=None):
    """(train dataset, eval dataset, reward functions, weights): what is passed in, else what
    ``cfg.dataset`` / ``cfg.reward`` / ``cfg.reward_model`` name (docs/data-and-rewards.md), else the
    built-in ``cfg.task``. Resolved before any model is loaded, so bad input stops here."""
    from pg_lm.tasks import TASKS

    from .data import datasets_from_config
    from .reward_specs import rewards_from_config

    if train_dataset is None and eval_dataset is None:
        train_dataset, eval_dataset = datasets_from_config(cfg)
    if reward_fns is None and (cfg.reward or cfg.reward_model):
        reward_fns, weights = rewards_from_config(cfg)
        reward_weights = reward_weights if reward_weights is not None else weights
    if reward_fns is None and (cfg.dataset or cfg.eval_dataset):
        raise ValueError("--dataset needs a reward: --reward path/to/file.py:function (or module:function, or a "
                         "built-in), or --reward-model")
    if reward_weights is None and cfg.reward_weights:
        reward_weights = list(cfg.reward_weights)
    if train_dataset is None or reward_fns is None:
        num_eval = cfg.eval_size if cfg.eval_size is not None else 100
        task_train, task_eval, task_rewards = TASKS[cfg.task](num_eval=num_eval, seed=0)
        train_dataset = task_train if train_dataset is None else train_dataset
        eval_dataset = task_eval if eval_dataset is None and not cfg.dataset else eval_dataset
        reward_fns = task_rewards if reward_fns is None else reward_fns
    return train_dataset, eval_dataset, reward_fns, reward_weights


def train(cfg: LMConfig, reward_fns=None, train_dataset=None, eval_dataset=None, reward_weights=None,
          env=None) -> dict:
    """Train and return the summary. Datasets and rewards not passed in come from the config's
    ``dataset`` / ``reward`` flags, else from the built-in ``cfg.task``. With ``env`` (a function
    making a text environment: pg_lm.envs) or ``cfg.env``: episodes of many turns, rewarded by the
    environment, on ``train_dataset``'s rows or ``--dataset``'s when given (docs/environments.md)."""
    from .data import datasets_from_config
    from .reward_specs import rewards_from_config
    from .trainer import Trainer

    if env is not None or cfg.env is not None:
        if train_dataset is None and cfg.dataset:
            train_dataset = datasets_from_config(cfg)[0]
        if reward_fns is None and (cfg.reward or cfg.reward_model):  # a final reward beside the environment's
            reward_fns, weights = rewards_from_config(cfg)
            reward_weights = reward_weights if reward_weights is not None else weights
        return Trainer(cfg, reward_fns or [], train_dataset, None, reward_weights, env=env).train()
    train_dataset, eval_dataset, reward_fns, reward_weights = prompts_and_rewards(
        cfg, reward_fns, train_dataset, eval_dataset, reward_weights)
    return Trainer(cfg, reward_fns, train_dataset, eval_dataset, reward_weights).train()


def run_cli(argv: list[str] | None, prog: str, fn, **defaults) -> int:
    """Parse flags into an LMConfig, check the launch, apply the CPU layer's process settings when
    it runs, call ``fn(cfg)``; user errors become one line on stderr, exit 2; a run stopped by
    non-finite values or a failed inference engine exits 1, one stopped by SIGINT / SIGTERM (after saving) 130 / 143."""
    from pg_lm.run.signals import Interrupted

    from .cpu.process import apply_process_settings
    from .engine import EngineError
    from .setup import plan
    from .health import NonFiniteError

    cfg = parse_config(LMConfig, argv, prog=prog, **defaults)
    try:

        if plan(cfg).cpu_layer:  # before any model is loaded: a launch that cannot run stops here
            apply_process_settings()
        fn(cfg)
    except (ValueError, RewardError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, EngineError) as e:
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
