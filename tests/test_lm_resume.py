"""Checkpoints and ``--resume``: a resumed run continues where the checkpoint left off
(weights, optimizer, scheduler, step, logs), and a run that dies loses nothing it saved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lm_fixtures import make_trainer, prompt_dataset, read_jsonl, snapshot, varied_reward
from pg_lm.lm import RewardError

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def unwrap(trainer):
    return trainer.acc.unwrap_model(trainer.policy)


def state(tmp_path):
    return torch.load(tmp_path / "checkpoint-last" / "trainer_state.pt", weights_only=False)


def train_rows(tmp_path):
    return [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward/mean" in r]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2-tied"])
def test_resume_continues_from_the_saved_step(request, tmp_path, arch):
    tiny_lm_dir = request.getfixturevalue("tiny_lm_dir" if arch == "llama" else "tiny_gpt2_dir")
    kw = dict(lr=1e-2, warmup_steps=4, save_every=2, eval_size=2, samples_every=1)
    evals = prompt_dataset(["zz", "y"])
    first = make_trainer(tiny_lm_dir, tmp_path, max_steps=2, eval_dataset=evals, **kw)
    s1 = first.train()
    weights = snapshot(unwrap(first))
    assert s1["train/steps"] == 2 and state(tmp_path)["step"] == 2
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2]

    second = make_trainer(tiny_lm_dir, tmp_path, max_steps=4, resume=True, eval_dataset=evals, **kw)
    assert second.step == 2
    assert_same(snapshot(unwrap(second)), weights)  # the checkpoint's weights, not the base model's
    adam = second.opt.state_dict()["state"]
    assert adam and all(float(s["step"]) == 2 for s in adam.values())  # the optimizer's moments came back
    assert second.sched.get_last_lr()[0] == pytest.approx(1e-2 * 3 / 4)  # warm-up continues at step 3 of 4
    s2 = second.train()

    assert s2["train/steps"] == 4 and s2["train/steps_this_run"] == 2
    assert s2["eval/reward_before"] == s1["eval/reward_before"]  # measured once, before any training
    assert state(tmp_path)["step"] == 4
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2, 3, 4]  # appended, not restarted
    assert sorted({r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")}) == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train/steps"] == 4 and summary["wall_s"] >= s1["wall_s"]


def test_resume_without_a_checkpoint_is_an_error(tiny_lm_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        make_trainer(tiny_lm_dir, tmp_path, resume=True)


def test_resume_refuses_a_checkpoint_of_another_shape_before_any_model_loads(tiny_lm_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """A checkpoint saved with other weights (LoRA rank, value head through the estimator, model) is
    refused at start-up, naming every setting that differs, in one line, with exit 2 from the CLI."""
    import pg_lm.lm.setup
    from pg_lm.lm.train import main

    make_trainer(tiny_lm_dir, tmp_path, max_steps=1, lora_r=4, save_every=1).train()

    def no_load(*a, **kw):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(pg_lm.lm.setup, "load_policy", no_load)
    with pytest.raises(ValueError, match=r"--lora-r 4 there, 8 here; --estimator 'reinforce' there, 'gae' here"):
        make_trainer(tiny_lm_dir, tmp_path, max_steps=2, lora_r=8, estimator="gae", resume=True)
    with pytest.raises(ValueError, match=r"--model .* there, 'another-model' here"):
        make_trainer(tiny_lm_dir, tmp_path, max_steps=2, lora_r=4, resume=True, model="another-model")
    argv = ["--model", str(tiny_lm_dir), "--output-dir", str(tmp_path), "--lora-r", "2", "--resume", "true",
            "--max-steps", "2", "--progress", "false", "--mixed-precision", "no"]
    capsys.readouterr()  # (what the runs above printed)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume:") and "--lora-r 4 there, 2 here" in err[0], err


def test_resume_lora_with_value_head(tiny_lm_dir, tmp_path):
    kw = dict(lora_r=4, estimator="gae", lr=1e-2)
    first = make_trainer(tiny_lm_dir, tmp_path, max_steps=2, **kw)
    first.train()
    weights = snapshot(unwrap(first))
    files = {p.name for p in (tmp_path / "checkpoint-last").iterdir()}
    assert {"adapter_config.json", "value_head.pt"} <= files and "model.safetensors" not in files

    second = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, resume=True, **kw)
    assert second.step == 2
    assert_same(snapshot(unwrap(second)), weights)  # adapter and value head both restored
    assert second.train()["train/steps"] == 3


def test_resumed_kl_reference_is_the_original_model(tiny_lm_dir, tmp_path):
    """The KL penalty anchors to the model the run started from; resuming must not re-anchor
    it to the checkpoint (that would silently reset the KL to 0 at every resume)."""
    from transformers import AutoModelForCausalLM

    first = make_trainer(tiny_lm_dir, tmp_path, max_steps=2, kl_coef=0.1, lr=3e-2)
    first.train()
    second = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, kl_coef=0.1, lr=3e-2, resume=True)
    base = {f"lm.{n}": p for n, p in AutoModelForCausalLM.from_pretrained(tiny_lm_dir).named_parameters()}
    ref = snapshot(second.acc.unwrap_model(second.ref))
    assert_same(ref, base)
    assert second.train_step()["kl/ref"] > 1e-5


def test_a_crash_keeps_the_saved_checkpoint_and_resume_drops_lost_steps(tiny_lm_dir, tmp_path):
    calls = []

    def dies_on_step_4(prompts, completions, **_):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("reward server went away")
        return varied_reward(prompts, completions)

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[dies_on_step_4], max_steps=6, save_every=2, lr=1e-2)
    weights_at_2 = None
    real_step = tr.train_step

    def spy():
        nonlocal weights_at_2
        out = real_step()
        if tr.step == 2:
            weights_at_2 = {n[len("lm."):]: p for n, p in snapshot(unwrap(tr)).items()}
        return out

    tr.train_step = spy
    with pytest.raises(RewardError, match="dies_on_step_4.*reward server went away"):
        tr.train()
    ckpt = tmp_path / "checkpoint-last"
    assert state(tmp_path)["step"] == 2
    assert_same(load_file(ckpt / "model.safetensors"), weights_at_2)  # exactly what step 2 left
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2, 3]  # step 3 was logged, never saved

    resumed = make_trainer(tiny_lm_dir, tmp_path, max_steps=4, save_every=2, resume=True, lr=1e-2)
    assert resumed.step == 2
    resumed.train()
    # step 3 is redone from the checkpoint; the dead run's step-3 row must not stay beside it
    assert [r["step"] for r in train_rows(tmp_path)] == [1, 2, 3, 4]
    assert sorted({r["step"] for r in read_jsonl(tmp_path / "samples.jsonl")}) == [1, 2, 3, 4]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_lm_dir, tmp_path, monkeypatch):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, save_every=1, lr=1e-2)
    real_save, saves = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        if str(f).endswith("trainer_state.pt"):
            saves.append(1)
            if len(saves) == 2:
                raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        tr.train()
    monkeypatch.undo()
    assert state(tmp_path)["step"] == 1  # the step-1 checkpoint is whole ...
    resumed = make_trainer(tiny_lm_dir, tmp_path, max_steps=2, save_every=1, resume=True, lr=1e-2)
    assert resumed.step == 1  # ... and usable
    assert resumed.train()["train/steps"] == 2
    assert not (tmp_path / "checkpoint-last.tmp").exists()


def test_resume_after_a_crash_between_the_checkpoint_renames(tiny_lm_dir, tmp_path):
    """A save renames checkpoint-last to checkpoint-<its step>, then the sealed new folder to
    checkpoint-last; dying between the two leaves no checkpoint-last: the older one is used."""
    make_trainer(tiny_lm_dir, tmp_path, max_steps=2, save_every=1, lr=1e-2).train()
    (tmp_path / "checkpoint-last").rename(tmp_path / "checkpoint-last.tmp")
    resumed = make_trainer(tiny_lm_dir, tmp_path, max_steps=3, resume=True, lr=1e-2)
    assert resumed.step == 1
    assert resumed.train()["train/steps"] == 3
    assert state(tmp_path)["step"] == 3 and not (tmp_path / "checkpoint-last.tmp").exists()


def test_checkpoints_are_rotated_and_a_corrupt_one_is_skipped(tiny_lm_dir, tmp_path):
    make_trainer(tiny_lm_dir, tmp_path, max_steps=3, save_every=1, lr=1e-2).train()  # --save-total-limit 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-last"]
    with open(tmp_path / "checkpoint-last" / "model.safetensors", "r+b") as f:  # one flipped byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.warns(UserWarning, match="model.safetensors does not match its checksum"):
        resumed = make_trainer(tiny_lm_dir, tmp_path, max_steps=4, resume=True, lr=1e-2)
    assert resumed.step == 2


def test_a_fresh_run_starts_over_without_an_earlier_runs_checkpoints(tiny_lm_dir, tmp_path):
    make_trainer(tiny_lm_dir, tmp_path, max_steps=3, save_every=1, save_total_limit=None, lr=1e-2).train()
    assert len(list(tmp_path.glob("checkpoint-*"))) == 3
    fresh = make_trainer(tiny_lm_dir, tmp_path, max_steps=1, lr=1e-2)  # no --resume: an earlier run is not continued
    assert fresh.step == 0 and not list(tmp_path.glob("checkpoint-*"))
    fresh.train()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-last"] and state(tmp_path)["step"] == 1
