"""Every language-model recipe runs end to end on the tiny model with a tiny
budget, as a user would run it (a subprocess with flags), and leaves every output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_fixtures import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["arithmetic", "custom_reward", "guess_number"]
METRIC_KEYS = {"reward/mean", "loss/policy", "completion/length", "perf/tokens_per_s"}
SUMMARY_KEYS = {"eval/reward_before", "eval/reward_after", "wall_s", "train/steps"}
EXTRA_METRICS = {"arithmetic": {"reward/exact_match"}, "custom_reward": {"reward/mentions_keyword", "reward/brevity"},
                 "guess_number": {"episode/turns", "perf/env_s"}}


@pytest.mark.parametrize("cpu_layer", ["auto", "off"])  # off: the plain path, what a GPU runs
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end(recipe, cpu_layer, tiny_lm_dir, tmp_path):
    script = ROOT / "recipes" / f"{recipe}.py"
    assert script.exists(), f"{script} is missing"
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(script), "--model", tiny_lm_dir, "--max-steps", "2", "--eval-size", "4", "--lora-r", "0",
           "--output-dir", str(out), "--cpu-layer", cpu_layer]
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    config = json.loads((out / "config.json").read_text())
    assert config["model"] == tiny_lm_dir and config["max_steps"] == 2 and config["eval_size"] == 4
    layer = config["cpu_layer"]
    assert layer["mode"] == cpu_layer and layer["enabled"] == (cpu_layer == "auto")
    assert layer["decode"] == ("llama" if cpu_layer == "auto" else "model")
    # the recipe applied the process settings at start-up only with the layer on (Linux: huge pages asked for)
    assert layer["process_settings"]["huge_pages"] == (cpu_layer == "auto" and sys.platform.startswith("linux"))

    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = (METRIC_KEYS | EXTRA_METRICS[recipe]) - set(r)
        assert not missing, missing
        assert all(isinstance(r[k], (int, float)) for k in METRIC_KEYS)

    samples = read_jsonl(out / "samples.jsonl")
    assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["train/steps"] == 2 and summary["wall_s"] > 0
    assert 0.0 <= summary["eval/reward_before"] <= 1.0 and 0.0 <= summary["eval/reward_after"] <= 1.0

    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = out / "checkpoint-last"
    files = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"} <= files, files
