"""Teach the embedded SmolLM2-135M-Instruct two-digit addition with RL.

Prompts are "What is 23 + 45?"; the reward is 1 when the completion's last number is
the sum. Held-out greedy accuracy is measured before and after training. Run with no
arguments for the default (about 11 minutes on a 2-core CPU: this is ``make demo``); every LMConfig field is
a flag (`python recipes/arithmetic.py --help`), e.g. `--estimator gae` or `--lora-r 16`.
"""

import sys

from pg_lm.lm.train import run_cli, train

# The recipe's defaults (flags override them). Leave-one-out baseline over 8 samples per
# prompt (RLOO), 16 new tokens (the evaluation's budget), LoRA r16 at lr 2e-4 with cosine
# decay over the time budget (full fine-tuning: --lora-r 0 --lr 2e-5); bf16 autocast (fp32
# master weights) where the hardware makes it faster. Its results: README "Quickstart".
DEFAULTS = dict(
    task="arithmetic",
    output_dir="runs/arithmetic",
    max_steps=400,
    max_seconds=640.0,
    prompts_per_step=4,
    samples_per_prompt=8,
    max_new_tokens=16,
    estimator="reinforce",
    baseline="loo",
    lr=2e-4,
    lr_schedule="cosine",
    lora_r=16,
    eval_every=0,
    eval_size=100,
    mixed_precision="auto",
)

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:], "recipes/arithmetic.py", train, **DEFAULTS))
