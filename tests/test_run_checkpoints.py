"""Checkpoint folders: sealed with checksums, rotated, and a damaged one skipped on resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pg_lm.run import trim_logs
from pg_lm.run.checkpoints import LAST, checkpoints, clear, commit, find_resumable, problem, rng_state, set_rng_state, step_of


def save(out, step, keep=2, payload=None):
    def write(folder):
        (folder / "weights.bin").write_bytes(payload or f"weights at {step}".encode())
        (folder / "sub").mkdir()
        (folder / "sub" / "state.txt").write_text(str(step))
    return commit(out, step, write, keep)


def test_commit_rotates_and_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, keep=2)
    names = [p.name for p in checkpoints(tmp_path)]
    assert names == [LAST, "checkpoint-4"]  # checkpoint-2 rotated out
    assert step_of(tmp_path / LAST) == 6 and (tmp_path / LAST / "sub" / "state.txt").read_text() == "6"
    assert problem(tmp_path / LAST) is None and problem(tmp_path / "checkpoint-4") is None
    assert not (tmp_path / f"{LAST}.tmp").exists()


def test_clear_removes_every_checkpoint_and_nothing_else(tmp_path):
    for step in (2, 4):
        save(tmp_path, step)
    (tmp_path / f"{LAST}.tmp").mkdir()  # a save cut short
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert clear(tmp_path) == 3
    assert checkpoints(tmp_path) == [] and not (tmp_path / f"{LAST}.tmp").exists()
    assert (tmp_path / "metrics.jsonl").exists() and clear(tmp_path) == 0


def test_keep_none_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=None)
    assert [step_of(p) for p in checkpoints(tmp_path)] == [3, 2, 1]


@pytest.mark.parametrize("damage", ["corrupt", "missing_file", "unsealed"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_the_file(tmp_path, damage):
    save(tmp_path, 2)
    save(tmp_path, 4)
    last = tmp_path / LAST
    if damage == "corrupt":
        (last / "weights.bin").write_bytes(b"flipped bits")
        expect = "weights.bin does not match its checksum"
    elif damage == "missing_file":
        (last / "sub" / "state.txt").unlink()
        expect = "state.txt is missing"
    else:  # killed before the marker was written
        (last / "checksums.json").unlink()
        expect = "checksums.json is missing"
    with pytest.warns(UserWarning, match=expect):
        assert find_resumable(tmp_path) == tmp_path / "checkpoint-2"


def test_no_intact_checkpoint_is_one_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_resumable(tmp_path)
    save(tmp_path, 1, keep=1)
    (tmp_path / LAST / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="does not match its checksum"):
        find_resumable(tmp_path)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    save(tmp_path, 2)

    def dies(folder):
        (folder / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        commit(tmp_path, 4, dies, keep=2)
    assert find_resumable(tmp_path) == tmp_path / LAST and step_of(tmp_path / LAST) == 2


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_trim_logs_drops_rows_after_the_checkpoint_and_a_half_written_line(tmp_path):
    rows = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 5, "x"')  # killed mid-write
    trim_logs(tmp_path, 2)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
