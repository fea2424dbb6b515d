"""Trackers through ``--report-to``: W&B in offline mode gets every metrics row (TensorBoard's test is
in test_lm_trainer.py), and every metric a run logs is named in docs/data-and-rewards.md's table."""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import pytest

from lm_fixtures import make_trainer, prompt_dataset, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread
DOC = Path(__file__).resolve().parents[1] / "docs" / "data-and-rewards.md"


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file: a LevelDB-style log (7-byte file header; 32 KiB
    blocks of records, each crc32 / length / type then data) of ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, parts, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts, pos = parts + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_gets_every_metrics_row(tiny_lm_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    make_trainer(tiny_lm_dir, out, max_steps=2, report_to="wandb", save_model=False,
                 eval_dataset=prompt_dataset(["ab", "cd"])).train()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 60  # W&B's service process may still be writing the file when finish() returns
    while len(history := wandb_history(run_file)) < 3 and time.time() < deadline:
        time.sleep(0.5)
    ours: dict[int, dict] = {}  # W&B keeps one row per step: the last step's metrics and the final evaluation merge
    for row in read_jsonl(out / "metrics.jsonl"):
        ours.setdefault(row.pop("step"), {}).update(row)
    assert [r["_step"] for r in history] == list(ours) == [0, 1, 2]  # eval before, steps 1 and 2 (+ eval after)
    for theirs, (step, mine) in zip(history, ours.items()):
        assert {k: theirs[k] for k in mine} == pytest.approx(mine), step
    assert {"reward/mean", "eval/reward", "eval/accuracy"} <= set(history[2])


def test_every_logged_metric_is_in_the_documented_table(tiny_lm_dir, tmp_path):
    table = set(re.findall(r"^\| `([^`]+)`", DOC.read_text(), re.M))
    logged = set()
    for i, kw in enumerate([dict(estimator="gae", kl_coef=0.1, eval_samples=2),
                            dict(kl_coef=0.1, kl_target=1.0, entropy_coef=0.01),
                            dict(baseline="group_mean", dynamic_sampling=True, sampler_correction="tis",
                                 clip_low=0.2, clip_ratio_c=3.0),
                            dict(baseline="remax"), dict(update="trpo", estimator="gae")]):
        out = tmp_path / str(i)
        summary = make_trainer(tiny_lm_dir, out, max_steps=1, save_model=False, eval_dataset=prompt_dataset(["ab"]),
                               **kw).train()
        logged |= {k for r in read_jsonl(out / "metrics.jsonl") for k in r} | set(summary)
    generic = {k for k in logged if k.endswith(("varied_reward", "varied_reward_after", "varied_reward_before"))}
    normalise = {k: k.replace("varied_reward", "<name>") for k in generic}
    named = {normalise.get(k, k) for k in logged} - {"step"}
    named = {re.sub(r"pass@\d+", "pass@<k>", k) for k in named}
    # each eval/... before and after training is in the summary as eval/..._before / _after (one row says so)
    missing = sorted(k for k in named if k not in table and not k.endswith(("_after", "_before")))
    assert not missing, f"logged but not in {DOC.name}'s table: {missing}"
