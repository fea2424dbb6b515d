"""Helpers shared by the benchmark scripts: machine description, memory and speed probes, JSON.

Every benchmark records the machine it ran on (CPU model, cores, library versions) and
the 1-minute load average at its start and end: a load well above 0 at the start means
the machine was not idle and the timings are not worth publishing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def load1() -> float:
    """The 1-minute load average (the idleness record)."""
    return os.getloadavg()[0]


def machine_info(packages: tuple[str, ...] = ("torch", "transformers", "trl", "accelerate")) -> dict:
    import torch

    flags = ""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_bf16_flags": [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()],
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("pg_lm", *packages)},
    }


class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs, sampled by a thread.

    ``ru_maxrss`` cannot do this: it is the peak over the whole process life (model
    loading included) and never goes down. Sampling every ``interval`` s can miss a
    spike shorter than that; 10 ms is far below one training step here.
    """

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, 0
        self._proc, self._stop = psutil.Process(), threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def max_rss_mb() -> float:
    """This process's lifetime peak RSS (``ru_maxrss``, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype: str = "bfloat16", n: int = 2048, seconds: float = 3.0) -> dict:
    """The matmul throughput of this CPU: an (n, n) @ (n, n) product in ``dtype`` repeated for
    about ``seconds`` on all torch threads, 2 n^3 FLOPs each. bf16: the MFU denominator.

    On a CPU without bf16 instructions a 2048^3 bf16 product takes tens of seconds (1.3 GFLOP/s
    on the AVX2-only AMD EPYC): a 256^3 product timed first sets ``n`` lower where one product
    would take over ``seconds`` / 3."""
    import torch

    def timed(m):
        x, y = (torch.randn(m, m, dtype=getattr(torch, dtype)) for _ in range(2))
        x @ y  # warm-up: kernel selection, page faults
        t0 = time.perf_counter()
        x @ y
        return x, y, time.perf_counter() - t0

    rate = 2 * 256**3 / timed(256)[2]
    while n > 256 and 2 * n**3 / rate > seconds / 3:
        n //= 2
    a, b, _ = timed(n)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    elapsed = time.perf_counter() - t0
    return {"dtype": dtype, "n": n, "reps": reps, "seconds": elapsed, "flops_per_s": 2 * n**3 * reps / elapsed,
            "threads": torch.get_num_threads()}


def median(xs) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def write_json(path: str | os.PathLike, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print(f"wrote {path}")
