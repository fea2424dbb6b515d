"""Process-level speed settings that are safe to apply at start-up.

glibc returns freed large blocks to the OS (``munmap`` / heap trimming) and faults
them back in on the next step: hundreds of thousands of page faults per training
step for a 135M-parameter model on CPU. Keeping the memory mapped avoids that.
Blocks over 32 MB (glibc's ceiling for the mmap threshold) are always ``mmap``-ed, so
each step's (V, H) gradients and logits came back as fresh pages for the kernel to zero;
``M_MMAP_MAX = 0`` serves them from the heap too, where freed blocks are reused (no page
faults; the update 12-21% faster, README "Speed notes"). The same effect as
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` /
``MALLOC_MMAP_MAX_`` in the environment, applied with ``mallopt`` so users need not set
them. Disable with ``PG_LM_MALLOC_TUNING=0``.
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
_done = False


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                top_pad: int = TOP_PAD, mmap_max: int = MMAP_MAX) -> bool:
    """Apply the glibc malloc settings once; returns whether they were applied."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("PG_LM_MALLOC_TUNING", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(k, v) == 1 for k, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                    (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad),
                                                    (_M_MMAP_MAX, mmap_max)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    _done = ok
    return ok
