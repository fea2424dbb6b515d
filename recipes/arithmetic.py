"""Teach the embedded SmolLM2-135M-Instruct two-digit addition with RL.

Prompts are "What is 23 + 45?"; the reward is 1 when the completion's last number is
the sum. Held-out greedy accuracy is measured before and after training. Run with no
arguments for the default (about 11 minutes on a 2-core CPU: this is ``make demo``); every LMConfig field is
a flag (`python recipes/arithmetic.py --help`), e.g. `--estimator gae` or `--lora-r 16`.
"""

import sys

from pg_lm.lm.train import run_cli, train

# The settings this recipe measured best: leave-one-out baseline over 8 samples per prompt (RLOO),
# 16 new tokens (the evaluation's budget too), LoRA r16 at lr 2e-4 with cosine decay (full
# fine-tuning: --lora-r 0 --lr 2e-5); bf16 autocast (fp32 master weights) where the hardware makes
# it faster; every group trained as sampled (LMConfig's default resamples groups without reward
# spread, chosen over six tasks: BENCHMARKS.md section 12). A time budget, over which the cosine
# decays, and its output folder (flags override them). Its results: BENCHMARKS.md section 11.
DEFAULTS = dict(
    task="arithmetic",
    output_dir="runs/arithmetic",
    dynamic_sampling=False,
    max_steps=400,
    max_seconds=640.0,
)

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:], "recipes/arithmetic.py", train, **DEFAULTS))
