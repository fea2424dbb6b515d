"""``pg-lm gym`` that SIGKILLs its own process when the collector reaches a given env step:
a kill in the middle of a rollout, at a point the test picks exactly (these rollouts take
milliseconds, too fast to hit reliably by watching the output from outside).

    python tests/gym_kill_worker.py <env step> <pg-lm gym flags...>
"""

from __future__ import annotations

import os
import signal
import sys

from pg_lm.cli import main
from pg_lm.gym.rollout import Collector


def kill_at(env_step: int) -> None:
    real = Collector._step

    def step(self):
        if self.steps >= env_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self)

    Collector._step = step


if __name__ == "__main__":
    kill_at(int(sys.argv[1]))
    sys.exit(main(["gym", *sys.argv[2:]]))
