"""``pg-lm`` command line: ``pg-lm gym ...`` (classic control) and ``pg-lm lm ...`` (language models)."""

from __future__ import annotations

import sys

USAGE = """usage: pg-lm {gym,lm} [flags]

  pg-lm gym --env CartPole-v1 --algo ppo ...   classic-control policy gradients
  pg-lm lm  --task arithmetic --estimator reinforce ...   RL fine-tuning of a causal LM

Run `pg-lm gym --help` or `pg-lm lm --help` for every flag."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "gym":
        from pg_lm.gym.train import main as gym_main

        return gym_main(rest)
    if cmd == "lm":
        from pg_lm.lm.train import main as lm_main

        return lm_main(rest)
    print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
