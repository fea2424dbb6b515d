"""Plug in your own prompts and reward function.

A reward function is a plain callable ``fn(prompts, completions, **columns) -> list``:
one float per completion (or one list of per-token floats, for dense rewards).
``columns`` are the dataset's other fields, here ``keyword``. Copy this file, change
the prompts and the rewards, run it.
"""

import sys

from datasets import Dataset

from pg_lm.lm.train import run_cli, train

PROMPTS = [
    ("Write one short sentence about the sea.", "blue"),
    ("Write one short sentence about a forest.", "green"),
    ("Write one short sentence about the sun.", "yellow"),
    ("Write one short sentence about snow.", "white"),
    ("Write one short sentence about the night.", "dark"),
    ("Write one short sentence about grass.", "green"),
    ("Write one short sentence about the sky.", "blue"),
    ("Write one short sentence about coal.", "black"),
]


def mentions_keyword(prompts, completions, keyword, **_):
    """1.0 when the completion uses the prompt's colour word."""
    return [float(k in c.lower()) for c, k in zip(completions, keyword)]


def brevity(prompts, completions, **_):
    """Prefer completions of at most 60 characters."""
    return [0.0 if len(c) <= 60 else -0.5 for c in completions]


def make_datasets():
    rows = {"prompt": [p for p, _ in PROMPTS], "keyword": [k for _, k in PROMPTS]}
    return Dataset.from_dict(rows), Dataset.from_dict(rows)


def run(cfg):
    train_ds, eval_ds = make_datasets()
    # weights: the keyword matters most; brevity is a mild shaping term
    return train(cfg, [mentions_keyword, brevity], train_ds, eval_ds, reward_weights=[1.0, 0.5])


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:], "recipes/custom_reward.py", run, output_dir="runs/custom_reward",
                     max_steps=20, max_new_tokens=32, eval_size=8))
