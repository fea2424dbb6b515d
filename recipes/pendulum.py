"""Pendulum-v1 with PPO and the Gaussian head (continuous torque), about 1-2 minutes on a CPU.

    python recipes/pendulum.py                          # the per-env defaults: 150k steps
    python recipes/pendulum.py --target-return -200     # stop once an evaluation reaches -200

Per-env defaults (pg_lm/gym/config.py): γ = 0.95, observation normalisation and reward
scaling, a small entropy bonus, 4 envs x 1024 steps, 10 epochs of 16 minibatches.
A good policy swings up and balances: an evaluation return around -150 to -200.
"""

from __future__ import annotations

import sys

from pg_lm.gym import GymConfig, describe, train
from pg_lm.run import parse_config


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(GymConfig, argv, prog="recipes/pendulum.py",
                       env="Pendulum-v1", algo="ppo", output_dir="runs/pendulum-ppo")
    summary = train(cfg)
    print(describe(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
