"""Process-wide memory settings for training on a CPU, applied by an explicit call, never at import.

* **Transparent huge pages for torch's CPU tensors** (``THP_MEM_ALLOC_ENABLE=1``): the (V, H)
  gradients and logits of each step are then backed by 2 MB pages instead of hundreds of
  thousands of 4 kB ones to fault in. torch reads the variable once, at its first CPU
  allocation, so it is set (unless the environment already says otherwise, e.g. ``0``) as early
  as possible: :func:`apply_process_settings` is the first thing the CLI and the recipes do.
* **glibc malloc settings** (:func:`tune_malloc`): glibc returns freed large blocks to the OS
  (``munmap`` / heap trimming) and faults them back in on the next step. Blocks over 32 MB
  (glibc's ceiling for the mmap threshold) are always ``mmap``-ed, so each step's large tensors
  came back as fresh pages for the kernel to zero; ``M_MMAP_MAX = 0`` serves them from the heap
  too, where freed blocks are reused. The same effect as ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` / ``MALLOC_MMAP_MAX_`` in the environment,
  applied with ``mallopt`` so users need not set them. ``PG_LM_MALLOC_TUNING=0`` turns it off.

Both trade memory held by the process for fewer page faults; on a GPU neither matters, so they
belong to the CPU layer (``--cpu-layer off`` skips them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD, TRIM_THRESHOLD, TOP_PAD, MMAP_MAX = 32 << 20, 1 << 30, 256 << 20, 0
# the same settings as glibc reads them from the environment (for a process started with them)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
              "MALLOC_TOP_PAD_": str(TOP_PAD), "MALLOC_MMAP_MAX_": str(MMAP_MAX)}
THP_ENV = "THP_MEM_ALLOC_ENABLE"
_malloc_done = False
_applied: dict = {}


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                top_pad: int = TOP_PAD, mmap_max: int = MMAP_MAX) -> bool:
    """Apply the glibc malloc settings once; returns whether they were applied."""
    global _malloc_done
    if _malloc_done or not sys.platform.startswith("linux") or os.environ.get("PG_LM_MALLOC_TUNING", "1") == "0":
        return _malloc_done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(k, v) == 1 for k, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                    (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad),
                                                    (_M_MMAP_MAX, mmap_max)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    _malloc_done = ok
    return ok


def apply_process_settings() -> dict:
    """Turn on huge pages for torch's CPU tensors (unless ``THP_MEM_ALLOC_ENABLE`` is already set)
    and the malloc settings; once per process. Returns ``{"huge_pages": bool, "malloc": bool}``,
    what is in force. Call it before torch allocates its first CPU tensor for the huge pages to apply."""
    if not _applied:
        os.environ.setdefault(THP_ENV, "1")
        _applied.update(huge_pages=os.environ[THP_ENV] == "1", malloc=tune_malloc())
    return dict(_applied)


def applied() -> dict:
    """What :func:`apply_process_settings` put in force in this process (all False if it was not called)."""
    return dict(_applied) or {"huge_pages": False, "malloc": False}
