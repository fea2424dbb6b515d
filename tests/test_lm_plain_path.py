"""The plain path -- the model's own forward and generation, precision through Accelerate, no CPU layer --
trained end to end on every device there is: on the CPU with ``--cpu-layer off`` in the default run, and on
CUDA (marker ``gpu``, ``make test-gpu``; skipped without CUDA) in fp32 and bf16.

Each device runs the same checks: one step changes the weights (with zero-advantage rows skipped);
LoRA leaves the base alone; GAE + PPO; KL to a frozen reference and to the base with the adapter
disabled; the sampler's log-probs of the tokens it drew equal the learner's to the precision's
rounding. CUDA adds a short arithmetic run on the embedded model whose held-out accuracy rises, and,
with two GPUs, the DDP and FSDP2 gradients equal to the one-GPU gradient; DeepSpeed ZeRO-2 where it
is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_fixtures import PROMPTS, make_trainer, snapshot, varied_reward

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
gpu = [pytest.mark.gpu, needs_cuda]
DEVICES = [pytest.param("cpu", id="cpu-plain"), pytest.param("cuda", id="cuda", marks=gpu)]
PRECISIONS = ["no", "bf16"]


def half_constant(prompts, completions, **_):
    """Constant for half the prompts (their groups get advantage 0: skipped rows), varied for the others."""
    varied = varied_reward(prompts, completions)
    return [1.0 if PROMPTS.index(p) % 2 else v for p, v in zip(prompts, varied)]


def trainer_on(device: str, tmp_path, **kw):
    tr = make_trainer(kw.pop("model"), tmp_path, cpu_layer="off" if device == "cpu" else "auto", **kw)
    assert tr.acc.device.type == device and not tr.cpu_layer and tr.sampler is None
    lm = tr.acc.unwrap_model(tr.policy).lm
    assert next(lm.parameters()).device.type == device and lm.config._attn_implementation == "sdpa"
    return tr


def _moved(before: dict, module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_default_step_skips_inert_rows_and_moves_the_weights(device, precision, tiny_lm_dir, tmp_path):
    tr = trainer_on(device, tmp_path, model=tiny_lm_dir, reward_fns=(half_constant,), mixed_precision=precision,
                    prompts_per_step=4, dynamic_sampling=False)  # the constant groups kept, to be skipped
    assert json.loads((tmp_path / "config.json").read_text())["cpu_layer"]["enabled"] is False
    lm = tr.acc.unwrap_model(tr.policy).lm
    before = snapshot(lm)
    stats = tr.train_step()
    assert 0 < stats["perf/trained_frac"] < 1  # the constant groups were skipped
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert _moved(before, lm)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_moves_the_adapter_only(device, precision, tiny_lm_dir, tmp_path):
    tr = trainer_on(device, tmp_path, model=tiny_lm_dir, lora_r=4, lr=1e-2, mixed_precision=precision)
    lm = tr.acc.unwrap_model(tr.policy).lm
    before = snapshot(lm)
    tr.train_step()
    moved = _moved(before, lm)
    assert moved and all("lora_" in n for n in moved)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_gae_with_ppo_epochs_minibatches_and_clipping(device, precision, tiny_lm_dir, tmp_path):
    tr = trainer_on(device, tmp_path, model=tiny_lm_dir, estimator="gae", ppo_epochs=2, num_minibatches=2,
                    clip_low=0.2, value_clip=0.2, mixed_precision=precision)
    policy = tr.acc.unwrap_model(tr.policy)
    head = policy.value_head.weight.detach().clone()
    stats = tr.train_step()
    assert {"loss/value", "policy/clip_frac", "value/explained_var"} <= set(stats)
    assert not torch.equal(head, policy.value_head.weight.detach())


@pytest.mark.parametrize("lora_r", [0, 4], ids=["frozen-copy", "adapter-disabled"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_kl_to_the_reference(device, precision, lora_r, tiny_lm_dir, tmp_path):
    tr = trainer_on(device, tmp_path, model=tiny_lm_dir, kl_coef=0.1, lora_r=lora_r, lr=1e-2,
                    mixed_precision=precision, max_steps=2)
    assert (tr.ref is not None) == (lora_r == 0)
    first = tr.train_step()
    second = tr.train_step()
    # the first step samples from the reference itself: KL 0 up to rounding; then the policy has moved
    assert abs(first["kl/ref"]) < (1e-4 if precision == "no" else 0.05)
    assert second["kl/ref"] > 0 and torch.isfinite(torch.tensor(second["loss/kl"]))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_sampler_and_learner_log_probs_agree(device, precision, tiny_lm_dir, tmp_path, monkeypatch):
    """The log-probs the sampler drew each token with (KV-cached decoding) against the learner's
    forward on the finished sequences (one pass, shared prompt): equal up to the precision's rounding."""
    import pg_lm.lm.sampling as sampling

    tr = trainer_on(device, tmp_path, model=tiny_lm_dir, mixed_precision=precision, max_new_tokens=8)
    steps = []
    real = sampling._pick

    def pick(logits, *a):
        tok = real(logits, *a)
        steps.append(logits.float().log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1))
        return tok

    monkeypatch.setattr(sampling, "_pick", pick)
    batch, _ = tr.rollout()
    drawn = torch.stack(steps, 1)[:, : batch.completion_mask.shape[1]]  # (B, T)
    learner = tr.forward(batch, grad=False)[0]
    m = batch.completion_mask.bool()
    diff = (drawn - learner)[m].abs()
    assert m.sum() > 0
    if precision == "no":
        assert diff.max() < 1e-4, diff.max()
    else:  # bf16 logits carry ~3 significant digits
        assert diff.mean() < 0.05 and diff.max() < 0.3, (diff.mean(), diff.max())


# ---------------------------------------------------------------------------------------------- CUDA only


def _env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.gpu
@needs_cuda
def test_arithmetic_recipe_learns_on_the_embedded_model(tmp_path):
    """The recipe's configuration on the embedded SmolLM2-135M-Instruct for 150 s of training."""
    out = tmp_path / "arith"
    cmd = [sys.executable, str(ROOT / "recipes" / "arithmetic.py"), "--max-seconds", "150", "--eval-size", "100",
           "--output-dir", str(out), "--progress", "false"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    print(json.dumps(summary))
    assert summary["eval/reward_after"] >= summary["eval/reward_before"] + 0.2, summary


def _launch(config: str, out: Path, flags=("--train",)) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2",
           str(ROOT / "tests" / "dist_grad_worker.py"), str(out.parent / "model"), str(out), *flags]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp2.yaml"])
def test_two_gpu_gradient_equals_the_one_gpu_gradient(config, tiny_lm_dir, tmp_path):
    import shutil

    import dist_grad_worker as worker

    shutil.copytree(tiny_lm_dir, tmp_path / "model")
    _launch(config, tmp_path / "two")
    two = torch.load(tmp_path / "two" / "grads_2.pt")
    one = worker.main(str(tmp_path / "model"), str(tmp_path / "one"))
    for case, grads in two.items():
        ref = one[case.split("/")[0]]
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-3, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.gpu
@needs_cuda
def test_deepspeed_zero2_trains(tiny_lm_dir, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", str(min(2, torch.cuda.device_count())),
           "-m", "pg_lm.cli", "lm", "--model", tiny_lm_dir, "--max-steps", "2", "--eval-size", "4", "--lora-r", "0",
           "--output-dir", str(out), "--progress", "false"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train/steps"] == 2
    assert json.loads((out / "config.json").read_text())["distributed_type"] == "DEEPSPEED"
