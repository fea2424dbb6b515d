"""Teach the embedded SmolLM2-135M-Instruct to play guess-the-number over several turns, with RL.

The environment (``pg_lm.envs.GuessNumber``) thinks of a number from 1 to 15 and answers each guess
with "Higher." or "Lower."; the turn whose guess is right ends the episode with reward 1. An
episode is at most 4 turns (binary search needs 4) of at most 8 new tokens each; the G = 8 episodes
of a group play the same secret. Success (the share of games won) and the mean return on 100
held-out games, one greedy episode each, are printed before and after training. Run with no
arguments for the default (40 steps: about 6 minutes on a 2-core CPU); every LMConfig field is a flag
(`python recipes/guess_number.py --help`), e.g. `--credit turn --turn-gamma 0.8` or `--max-turns 6`.
"""

import sys

from pg_lm.lm.train import run_cli, train

# The episode's return minus its group's leave-one-out mean on every action token (--credit episode,
# the library default: the best median of the credit modes here, BENCHMARKS.md section 10), and a
# higher learning rate than the library default, for a short run of 40 steps (a step budget: the
# same run on any machine, its cosine decay over the 40). Its results: BENCHMARKS.md section 13.
DEFAULTS = dict(
    env="guess",
    output_dir="runs/guess",
    max_turns=4,
    max_new_tokens=8,
    lr=1e-3,
    max_steps=40,
    max_seconds=None,
)

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:], "recipes/guess_number.py", train, **DEFAULTS))
