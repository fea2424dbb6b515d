"""``pg-lm`` command line: ``pg-lm gym ...`` (classic control), ``pg-lm lm ...`` (language models),
``pg-lm eval ...`` and ``pg-lm export ...`` (what a language-model run trained), ``pg-lm variance ...``
(the gradient variance of each estimator at a fixed policy) and ``pg-lm view ...`` (which tokens of
a run's logged completions got the credit)."""

from __future__ import annotations

import sys

USAGE = """usage: pg-lm {gym,lm,eval,export,variance,view} [flags]

  pg-lm gym --env CartPole-v1 --algo ppo ...   classic-control policy gradients
  pg-lm lm  --task arithmetic --estimator reinforce ...   RL fine-tuning of a causal LM
  pg-lm lm  --dataset data.jsonl --reward rewards.py:correct ...   ... on your prompts and rewards
  pg-lm eval --adapter runs/lm/checkpoint-last --eval-samples 8 ...   accuracy, pass@k, lengths
  pg-lm export runs/lm/checkpoint-last OUT_DIR   a LoRA adapter merged into its base, as an HF folder
  pg-lm variance --task arithmetic --batches 32 ...   gradient variance of each baseline
                  (--env CartPole-v1: gym's methods; --env guess: the credit modes of episodes)
  pg-lm view runs/lm [--step N]   logged completions, each token shaded by its advantage (view.html)

Run `pg-lm <command> --help` for every flag."""


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
    if cmd == "eval":
        from pg_lm.lm.eval_cli import main as eval_main

        return eval_main(rest)
    if cmd == "export":
        from pg_lm.lm.export import main as export_main

        return export_main(rest)
    if cmd == "variance":  # --env GYM_ID: the classic-control methods; else the language-model estimators
        if gym_env(rest):
            from pg_lm.gym.variance import main as variance_main
        else:
            from pg_lm.lm.variance import main as variance_main

        return variance_main(rest)
    if cmd == "view":
        from pg_lm.run.view import main as view_main

        return view_main(rest)
    print(f"error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def gym_env(args: list[str]) -> bool:
    """Whether ``args`` name a Gymnasium environment (``--env CartPole-v1``), not a text one (a built-in
    of pg_lm.envs, or ``file.py:Class`` / ``module:Class``: episodes of many turns for a language model)."""
    from pg_lm.envs import ENVS

    for k, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--env=") else args[k + 1] if a == "--env" and k + 1 < len(args) else None
        if value is not None:
            return value not in ENVS and ":" not in value
    return False


if __name__ == "__main__":
    sys.exit(main())
