"""A first run is quiet: ``pg-lm lm`` on the tiny model, as a user starts it (a subprocess with
Python's default warning filters), prints no library warning before training starts and no Python
warning at all; pg_lm's own ``warning: ...`` lines are left alone. Also: the one library warning
pg_lm silences (peft < 0.22 reading transformers' deprecated ``is_gradient_checkpointing`` when it
wraps a model) is silenced only for that message, from that module, inside ``peft_wrapping``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_WARNING = re.compile(r"\w+Warning: |warnings\.warn\(")  # how warnings.warn's output looks
TRAINING_STARTS = "eval before training:"  # pg_lm's line just before the first step


def test_cli_first_run_prints_no_library_warning(tiny_lm_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("PYTHONWARNINGS", "THP_MEM_ALLOC_ENABLE"):  # the user's default filters; the CPU layer sets THP itself
        env.pop(name, None)
    # LoRA on (the default --lora-r): wrapping the model with peft is where a deprecation came from
    cmd = [sys.executable, "-m", "pg_lm.cli", "lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path / "out"),
           "--max-steps", "1", "--eval-size", "2", "--prompts-per-step", "1", "--samples-per-prompt", "2",
           "--max-new-tokens", "4", "--progress", "false", "--save-model", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=240)
    out = proc.stdout.replace("\r", "\n")
    assert proc.returncode == 0, out[-6000:]
    assert TRAINING_STARTS in out, out[-6000:]
    before = out[: out.index(TRAINING_STARTS)]
    assert not [ln for ln in before.splitlines() if "warn" in ln.lower()], before[-6000:]
    assert not [ln for ln in out.splitlines() if PYTHON_WARNING.search(ln)], out[-6000:]


def _emit(message, category, module):
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_peft_wrapping_ignores_only_the_checkpointing_deprecation():
    from pg_lm.lm.policy import peft_wrapping

    deprecation = ("`is_gradient_checkpointing` is deprecated and will be removed in v6. "
                   "Use `is_activation_checkpointing` instead.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with peft_wrapping():
            _emit(deprecation, FutureWarning, "transformers.modeling_utils")  # ignored
            _emit("another deprecation", FutureWarning, "transformers.modeling_utils")
            _emit(deprecation, FutureWarning, "pg_lm.lm.trainer")
            _emit(deprecation, UserWarning, "transformers.modeling_utils")
        _emit(deprecation, FutureWarning, "transformers.modeling_utils")  # outside the block
    assert [(str(w.message), w.category) for w in caught] == [
        ("another deprecation", FutureWarning), (deprecation, FutureWarning), (deprecation, UserWarning),
        (deprecation, FutureWarning)]


def test_peft_wrapping_silences_the_real_property(tiny_lm_dir):
    """Reading the deprecated property of a real model inside the block warns nothing (where the
    installed transformers still has it)."""
    from transformers import AutoModelForCausalLM

    from pg_lm.lm.policy import peft_wrapping

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    if not hasattr(type(lm), "is_gradient_checkpointing"):
        pytest.skip("this transformers has no is_gradient_checkpointing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with peft_wrapping():
            assert lm.is_gradient_checkpointing is False
    assert caught == []
