"""The loss is normalised by GLOBAL counts, so the gradient of one update does not
depend on how the batch is split into processes or micro-batches (veRL #5625, TRL #5619).

``dist_grad_worker.py`` computes the gradient of ``Trainer.update`` on a fixed 8-row batch
(completion lengths 1..8): launched with the shipped Accelerate configs on 2 CPU processes (4 rows
each; ``cpu_ddp.yaml``: DDP over gloo, ``fsdp2.yaml``: FSDP2 over gloo) and here in one process on
all 8 rows, each with whole-batch and micro-batches. The launch also trains, checkpoints and (FSDP2)
resumes a run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_grad_worker as worker

# one thread (lm_fixtures.one_thread); 2-process launches, one at a time under xdist (conftest.py)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.two_process]

ROOT = Path(__file__).resolve().parents[1]


def run_two_processes(model_dir: str, out_dir: Path, launcher: list[str], *flags: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [*launcher, str(Path(__file__).with_name("dist_grad_worker.py")), model_dir, str(out_dir), *flags]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def launcher(config: str) -> list[str]:
    """``accelerate launch`` with a shipped config, as a user runs it (2 processes)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2"]


CPU_DDP = launcher("cpu_ddp.yaml")
FSDP2 = launcher("fsdp2.yaml")  # on a machine without a GPU pg_lm runs FSDP2 over gloo


@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_gradients_match_across_processes_and_micro_batches(tiny_lm_dir, tmp_path, launch):
    (tmp_path / "two").mkdir()
    run_two_processes(tiny_lm_dir, tmp_path / "two", CPU_DDP if launch == "ddp" else FSDP2, "--train")
    two = torch.load(tmp_path / "two" / "grads_2.pt")
    one = worker.main(tiny_lm_dir, str(tmp_path / "one"))  # one process, the whole batch, in this process
    assert set(one) == set(two) == set(worker.CASES) | set(worker.GAE_CASES)
    for case in one:
        ref = one[case.split("/")[0]]  # the same loss, one process, no micro-batching
        assert any(g.abs().sum() > 0 for g in ref.values()), case
        for label, grads in (("1 process", one[case]), ("2 processes", two[case])):
            assert grads.keys() == ref.keys(), (case, label)
            for name in ref:
                torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-7,
                                           msg=lambda m: f"{case}, {label}, {name}: {m}")
    # the value head is part of the gradient under gae, and its gradient is not zero
    vh = [n for n in one["gae"] if n.startswith("value_head")]
    assert vh and all(one["gae"][n].abs().sum() > 0 for n in vh)
    # the losses differ between aggregation modes (so the comparisons above are not vacuous)
    assert not torch.allclose(one["token-mean"]["lm.lm_head.weight"], one["seq-mean-token-mean"]["lm.lm_head.weight"])

    # episodes: observation tokens in the rows, the same gradient however the rows are split
    assert not torch.allclose(one["token-mean"]["lm.lm_head.weight"], one["episodes"]["lm.lm_head.weight"])
    env = json.loads((tmp_path / "two" / "env_step.json").read_text())  # a step and 3 held-out seeds over 2 processes
    assert env["episode/turns"] == 2.0 and env["eval/turns"] == 2.0 and 0 <= env["eval/accuracy"] <= 1

    # the same launch trained a step with a 1-prompt evaluation split over 2 processes
    run = tmp_path / "two" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["train/steps"] == 1
    config = json.loads((run / "config.json").read_text())
    assert config["num_processes"] == 2 and config["distributed_type"] == {"ddp": "MULTI_CPU", "fsdp2": "FSDP"}[launch]
    assert not config["cpu_layer"]["enabled"] or launch == "ddp"  # the CPU layer needs whole weights
    assert {"eval/reward_before", "eval/reward_after"} <= set(summary)
    # ... and ended with the process group freed: gloo's worker threads (pt_gloo_runloop, gloo_tcp_loop) left
    # alive into interpreter exit made 8 of 112 runs abort there (Trainer.end)
    for rank in (0, 1) if launch == "ddp" else ():  # (FSDP2's sharded parameters keep their group to the end)
        names = json.loads((tmp_path / "two" / f"threads_{rank}.json").read_text())
        if names is not None:
            assert not [n for n in names if "gloo" in n], (rank, names)

    # its checkpoint holds the whole model (FSDP2: gathered from both shards) and the whole optimizer state
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run / "checkpoint-last")
    start = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    moved = [n for n, p in saved.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert moved and all(torch.isfinite(p).all() for p in saved.parameters())
    state = torch.load(run / "checkpoint-last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and len(state["optimizer"]["state"]) == sum(1 for _ in start.parameters())
    if launch == "fsdp2":  # ... and a second launch resumes from it, sharding it again
        run_two_processes(tiny_lm_dir, tmp_path / "two", FSDP2, "--resume")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["train/steps"] == 2 and summary["train/steps_this_run"] == 1
