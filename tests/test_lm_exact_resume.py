"""Kill a run at any moment (SIGKILL), resume it with ``--resume``, and get the same run: the
same metrics (every key but timings) at every step after the checkpoint, and the same final
weights bit for bit, as the run that was never stopped. End to end through the CLI, in
subprocesses: full fine-tuning, LoRA with a value head, and 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lm_fixtures import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("perf/", "wall_s")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def command(model_dir, out, *flags, processes=1):
    launch = [sys.executable, "-m", "pg_lm.cli"]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
                  "-m", "pg_lm.cli"]
    return [*launch, "lm", "--model", str(model_dir), "--output-dir", str(out), "--max-steps", "8",
            "--save-every", "2", "--seed", "3", "--eval-size", "4", "--samples-every", "1", "--progress", "false",
            "--lr", "0.01", "--mixed-precision", "no", "--lora-r", "0", "--lr-schedule", "constant", "--samples-per-prompt", "4",
            "--max-new-tokens", "24", *flags]  # full fine-tuning unless flags ask for LoRA


def run(cmd, timeout=300):
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def steps_logged(out: Path) -> int:
    try:
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):  # not yet written, or a line half written
        return 0
    return max((r["step"] for r in rows if "reward/mean" in r), default=0)


def kill_after(cmd, out: Path, step: int, timeout=300) -> None:
    """Start ``cmd`` and SIGKILL its whole process group as soon as ``step`` is logged."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while steps_logged(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_jsonl(out / "metrics.jsonl")]


def weights(out: Path) -> dict:
    ckpt = out / "checkpoint-last"
    files = ["adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").exists() else "model.safetensors"]
    state = {k: v for f in files for k, v in load_file(ckpt / f).items()}
    if (ckpt / "value_head.pt").exists():
        import torch

        state.update({f"value_head.{k}": v for k, v in torch.load(ckpt / "value_head.pt").items()})
    return state


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = comparable(a), comparable(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x == y, f"step {x['step']} differs: " + ", ".join(
            f"{k}: {x.get(k)} vs {y.get(k)}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] == wb[name]).all(), f"{name} differs"  # bit for bit
    for log in ("samples.jsonl", "samples_tokens.jsonl"):  # cut back to the checkpoint, then logged again
        assert read_jsonl(a / log) == read_jsonl(b / log)


@pytest.mark.parametrize("kind", ["full", "lora_value_head", pytest.param("two_processes", marks=pytest.mark.two_process),
                                  "dapo_tis", "trpo_remax"])
def test_sigkill_then_resume_is_the_same_run(tiny_lm_dir, tmp_path, kind):
    flags = {"full": (), "lora_value_head": ("--lora-r", "4", "--estimator", "gae"),
             "two_processes": (),
             # dynamic sampling's extra rounds, the sampler's log-probs and their correction, dual-clip
             "dapo_tis": ("--loss-type", "dapo", "--sampler-correction", "tis", "--clip-ratio-c", "3"),
             # TRPO's natural step, and ReMax's greedy row decoded in every step's sampling loop
             "trpo_remax": ("--update", "trpo", "--baseline", "remax")}[kind]
    processes = 2 if kind == "two_processes" else 1
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(command(tiny_lm_dir, whole, *flags, processes=processes))
    kill_after(command(tiny_lm_dir, killed, *flags, processes=processes), killed, step=5)
    assert 5 <= steps_logged(killed) < 8  # killed mid-run, wherever step 6 had got to
    resumed = run(command(tiny_lm_dir, killed, *flags, "--resume", processes=processes))
    assert "Traceback" not in resumed.stderr
    assert_same_run(whole, killed)


@pytest.mark.slow
def test_the_embedded_model_killed_after_step_3_resumes_as_the_same_run(tmp_path):
    """The embedded SmolLM2-135M-Instruct on the default task, ``--max-steps 6 --save-every 2
    --seed 3``: killed once step 3 is logged, resumed from the step-2 checkpoint."""
    def cmd(out, *flags):
        return [sys.executable, "-m", "pg_lm.cli", "lm", "--output-dir", str(out), "--max-steps", "6",
                "--save-every", "2", "--seed", "3", "--samples-every", "1", "--progress", "false", *flags]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(cmd(whole), timeout=1500)
    kill_after(cmd(killed), killed, step=3, timeout=1500)
    assert 3 <= steps_logged(killed) < 6
    run(cmd(killed, "--resume"), timeout=1500)
    assert_same_run(whole, killed)
