"""Checkpoint folders a run can trust, for both backends: written whole or not at all,
checked on resume, rotated; and the random state a resumed run needs to be the same run.

Layout in ``output_dir``: ``checkpoint-last/`` is the newest checkpoint, older ones are
``checkpoint-<step>/``; at most ``keep`` folders are kept (``--save-total-limit``). A folder
is complete when its ``checksums.json`` (written last) lists the SHA-256 of every other file
in it. :func:`commit` writes a folder next to the others and swaps it in with renames, so a
run killed at any moment leaves every earlier checkpoint intact; :func:`find_resumable`
takes the newest folder whose files match their checksums and warns, naming the file, about
each newer one that does not (a save cut short, a disk error).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

LAST = "checkpoint-last"
CHECKSUMS = "checksums.json"
_OLDER = re.compile(r"checkpoint-(\d+)$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def step_of(folder: Path) -> int | None:
    """The step a complete checkpoint folder was saved at (None when it has no readable marker)."""
    try:
        return int(json.loads((folder / CHECKSUMS).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint (naming the file), or None when it is."""
    marker = folder / CHECKSUMS
    try:
        sums = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{marker} is missing or unreadable (the save did not finish)"
    have = {str(p.relative_to(folder)) for p in _files(folder)}
    for name in sorted(set(sums) - have):
        return f"{folder / name} is missing"
    for name, digest in sums.items():
        if sha256(folder / name) != digest:
            return f"{folder / name} does not match its checksum (corrupt)"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder in ``output_dir``, newest first: ``checkpoint-last``, then by step."""
    out = Path(output_dir)
    older = sorted((p for p in out.glob("checkpoint-*") if _OLDER.match(p.name) and p.is_dir()),
                   key=lambda p: -int(_OLDER.match(p.name).group(1)))
    return ([out / LAST] if (out / LAST).is_dir() else []) + older


def find_resumable(output_dir: str | Path) -> Path:
    """The newest intact checkpoint; a warning names each newer one that is not and why.
    ``FileNotFoundError`` (one line) when there is none."""
    skipped = []
    for folder in checkpoints(output_dir):
        why = problem(folder)
        if why is None:
            for reason in skipped:
                warnings.warn(f"--resume: skipping a damaged checkpoint: {reason}; using {folder}", stacklevel=2)
            return folder
        skipped.append(why)
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(f"--resume: no complete checkpoint in {output_dir}{detail}")


def commit(output_dir: str | Path, step: int, write: Callable[[Path], None], keep: int | None) -> Path:
    """Write a checkpoint for ``step`` with ``write(folder)``, seal it with its checksums, make it
    ``checkpoint-last`` (the previous one becomes ``checkpoint-<its step>``) and delete all but
    the newest ``keep`` folders (None: keep all). Call on one process only."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{LAST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    sums = {str(p.relative_to(tmp)): sha256(p) for p in _files(tmp)}
    (tmp / CHECKSUMS).write_text(json.dumps({"step": step, "files": sums}, indent=1) + "\n")
    last = out / LAST
    if last.exists():
        prev = step_of(last)
        if prev is None or prev == step:  # unsealed, or this very step saved again: not worth keeping
            shutil.rmtree(last)
        else:
            older = out / f"checkpoint-{prev}"
            shutil.rmtree(older, ignore_errors=True)
            last.rename(older)
    tmp.rename(last)
    if keep is not None:
        for folder in checkpoints(out)[keep:]:
            shutil.rmtree(folder, ignore_errors=True)
    return last


def clear(output_dir: str | Path) -> int:
    """Delete every checkpoint folder in ``output_dir`` (a fresh run there starts over: an earlier
    run's checkpoints would otherwise outrank its own in rotation and in ``--resume``); returns
    how many were deleted. Call on one process only."""
    out = Path(output_dir)
    found = checkpoints(out) + ([out / f"{LAST}.tmp"] if (out / f"{LAST}.tmp").exists() else [])
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    return len(found)


# ---------------------------------------------------------------- random state
def rng_state() -> dict:
    """Every random generator this process draws from: Python's, NumPy's global one, torch's
    CPU generator and each CUDA device's. Restored by :func:`set_rng_state`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
