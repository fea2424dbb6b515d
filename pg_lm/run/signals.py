"""SIGINT / SIGTERM end a run cleanly, in both backends: the step under way finishes, a checkpoint
is saved, and the process exits 128 + the signal (130 / 143) with a line saying how to go on."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager


class Interrupted(Exception):
    """The run was stopped by SIGINT / SIGTERM (and saved a checkpoint, unless ``path`` is None);
    ``exit_code`` is 128 + the signal."""

    def __init__(self, signum: int, step: int, path):
        self.exit_code = 128 + signum
        saved = (f"checkpoint saved in {path} (continue with --resume)" if path is not None
                 else "no checkpoint saved (--save-every 0)")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}")


@contextmanager
def stop_on_signals(run):
    """SIGINT and SIGTERM set ``run.signal``: the run stops after the step under way, saves a
    checkpoint and raises :class:`Interrupted`. A second signal more than a second later (not a
    launcher passing on the first) stops the process at once, as it would without this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first = [0.0]

    def handler(signum, frame):
        if run.signal is None:
            run.signal, first[0] = signum, time.monotonic()
            print(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop now)", flush=True)
        elif time.monotonic() - first[0] > 1.0:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
