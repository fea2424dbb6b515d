"""When one process of a multi-process run fails, the others stop within a second, with its error.

Without this a process whose peer died waits in its next collective: over gloo until the dead
peer's socket closes (and then with an error about the socket, not the cause), over NCCL until
the collective times out or the launcher kills it. Here a failing process writes its error to
the launch's key-value store (the ``torchrun`` / ``accelerate launch`` rendezvous store at
``MASTER_ADDR:MASTER_PORT``) before it exits, and every process watches that key from a daemon
thread: on seeing a peer's error it prints it as one line and exits with status 1.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta

KEY = "pg_lm/failed"


def _client():
    """A client of the launch's store, or None (one process, or a launch without one)."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and dist.is_available()):
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=10))
    except (RuntimeError, ValueError):
        return None


def _stop(message: str) -> None:
    print(f"error: stopping: {message}", file=sys.stderr, flush=True)
    os._exit(1)


class PeerWatch:
    """Watches for a peer's failure (``poll_s`` apart) and reports this process's own."""

    def __init__(self, rank: int, poll_s: float = 0.5):
        self.rank, self.poll_s = rank, poll_s
        self._done = threading.Event()
        self._store = _client()  # used by the main thread only; the watcher opens its own
        self._thread = None
        if self._store is not None:
            self._thread = threading.Thread(target=self._watch, name="pg_lm-peer-watch", daemon=True)
            self._thread.start()

    def _peer_error(self, store) -> str | None:
        if not store.check([KEY]):
            return None
        message = store.get(KEY).decode()
        return None if message.startswith(f"rank {self.rank}:") else message

    def _watch(self) -> None:
        store = _client()
        while store is not None and not self._done.wait(self.poll_s):
            try:
                message = self._peer_error(store)
            except RuntimeError:  # the store is gone: the launch is ending
                break
            if message is not None:
                _stop(message)
        del store  # closed here, in the thread that used it

    def failed(self, error: BaseException) -> None:
        """Tell the peers this process failed with ``error``; if a peer failed first (this error is
        then a consequence, e.g. a closed socket), stop now with the peer's error instead."""
        if self._store is None:
            return
        try:
            first = self._peer_error(self._store)
            if first is not None:
                _stop(first)
            self._store.set(KEY, f"rank {self.rank}: {type(error).__name__}: {error}")
        except RuntimeError:
            pass

    def close(self) -> None:
        """Stop watching and wait for the watcher, so that no thread is inside the store's client
        when the interpreter exits (that aborts the process)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        self._store = None
