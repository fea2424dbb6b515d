"""The CPU layer's process settings (pg_lm/lm/cpu/process.py): glibc malloc tuning and huge pages for
torch's CPU tensors, applied by an explicit call (the CLI and the recipes make it), never at import."""

import subprocess
import sys
from pathlib import Path

import pytest

from pg_lm.lm.cpu.process import tune_malloc

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# allocate and touch a 64 MB tensor, then report the process's anonymous huge-page memory (kB)
PROBE = """
import os, sys
import torch
import pg_lm.lm  # noqa: F401  importing changes nothing
if sys.argv[1] == "apply":
    from pg_lm.lm.cpu.process import apply_process_settings
    apply_process_settings()  # after torch's import, before its first CPU allocation
x = torch.empty(64 << 20, dtype=torch.uint8)
x.fill_(1)
kb = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), kb)
"""


def _probe(first: str, env_thp: str | None) -> tuple[str, int]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_thp
    out = subprocess.run([sys.executable, "-c", PROBE, first], env=env, capture_output=True, text=True, check=True)
    value, kb = out.stdout.split()
    return value, int(kb)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
                    reason="needs Linux with transparent huge pages available (madvise or always)")
def test_process_settings_back_large_tensors_with_huge_pages_and_importing_does_not():
    value, kb = _probe("apply", None)
    assert value == "1" and kb >= 32 << 10  # most of the 64 MB tensor sits on 2 MB pages
    value, kb = _probe("import", None)
    assert value == "None"  # no side effect at import
    if "[madvise]" in THP.read_text():  # then torch alone does not ask for them, and a user's "0" is respected
        assert kb < 32 << 10
        value, kb = _probe("apply", "0")
        assert value == "0" and kb < 32 << 10


def test_tune_malloc_applies_once_on_linux_glibc():
    ok = tune_malloc()
    assert tune_malloc() is ok  # idempotent
    if sys.platform.startswith("linux"):
        import platform

        assert ok == (platform.libc_ver()[0] == "glibc")


# an update's pattern of large tensors (sizes of SmolLM2's (V, H) gradients, logits, ...):
# allocate, compute, free, eight times over; print the page faults of all rounds but the first two
# (the heap is still growing then; it can grow a little later too, so no single round is judged)
REUSE = """
import resource, torch
from pg_lm.lm.cpu.process import tune_malloc
print(tune_malloc(), end=" ")
faults, out = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
for _ in range(8):
    f0 = faults()
    xs = [torch.ones(n) for n in (28311552, 18874368, 28311552, 7 << 20)]  # 113, 75, 113, 28 MB
    ys = [x * 2 for x in xs]
    del xs
    zs = [y + 1 for y in ys]
    del ys, zs
    out.append(faults() - f0)
print(sum(out[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_tune_malloc_reuses_freed_large_blocks():
    """Blocks over 32 MB are mmap-ed by default: freed, they go back to the OS and return as
    fresh pages to fault in, every round. With the settings (``M_MMAP_MAX = 0`` above all)
    the heap serves them again: no faults once it has grown to the working set."""
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")

    def late_faults(tuning: str) -> tuple[str, int]:
        env = {**os.environ, "PG_LM_MALLOC_TUNING": tuning, "THP_MEM_ALLOC_ENABLE": "0"}  # 4 kB pages: clear counts
        out = subprocess.run([sys.executable, "-c", REUSE], env=env, capture_output=True, text=True, check=True)
        applied, n = out.stdout.split()
        return applied, int(n)

    (applied, tuned), (off, untuned) = late_faults("1"), late_faults("0")
    assert (applied, off) == ("True", "False")
    assert untuned > 20000 and tuned * 20 < untuned, (tuned, untuned)  # measured: 0 vs 1.17-1.46 million
