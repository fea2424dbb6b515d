"""CartPole-v1 with PPO in a few seconds on a laptop CPU.

    python recipes/cartpole.py                      # the per-env defaults: 100k steps
    python recipes/cartpole.py --algo a2c --seed 1  # every `pg-lm gym` flag works here too

The same run from the command line: ``pg-lm gym --env CartPole-v1 --algo ppo``. Copy this
file to start your own: build a ``GymConfig`` (flags, or keyword arguments), call ``train``.
Outputs (config, metrics, learning curve, policy) land in ``runs/cartpole-ppo``.
"""

from __future__ import annotations

import sys

from pg_lm.gym import GymConfig, describe, train
from pg_lm.run import parse_config


def main(argv: list[str] | None = None) -> dict:
    # keyword defaults here < flags; every hyper-parameter left unset takes CartPole's per-env default
    cfg = parse_config(GymConfig, argv, prog="recipes/cartpole.py",
                       env="CartPole-v1", algo="ppo", output_dir="runs/cartpole-ppo")
    summary = train(cfg)
    print(describe(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
