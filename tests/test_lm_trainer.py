"""Training steps of a tiny random model through the one Trainer.

A step changes the parameters (and nothing when every advantage is 0); LoRA leaves the
base untouched and checkpoints the adapter alone; KL to the reference is 0 before the
first update; every estimator / baseline runs; bad inputs fail early and clearly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_fixtures import (constant_reward, make_config, make_trainer, prompt_dataset, read_jsonl, snapshot,
                         varied_reward)

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


def unwrap(trainer):
    return trainer.acc.unwrap_model(trainer.policy)


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


# ---------------------------------------------------------------- one step moves the weights


def test_one_step_changes_the_parameters(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, lr=1e-3)
    before = snapshot(unwrap(tr))
    stats = tr.train_step()
    after = snapshot(unwrap(tr))
    assert stats["reward/std"] > 0  # the reward varied, so the advantages did not all vanish
    assert math.isfinite(stats["loss/policy"]) and stats["policy/grad_norm"] > 0
    moved = changed(before, after)
    # every weight matrix that every token passes through has moved
    assert {n for n in before if "layers.0." in n or "lm_head" in n or n.endswith("norm.weight")} <= moved
    assert tr.step == 1
    for key in ("reward/mean", "reward/varied_reward", "completion/length", "policy/entropy", "perf/tokens_per_s",
                "advantage/mean", "lr"):
        assert math.isfinite(stats[key]), key


def test_zero_advantages_change_nothing(tiny_lm_dir, tmp_path):
    """The control for the test above: a constant reward under RLOO gives advantage 0 on every
    token, so the gradient is exactly 0 and AdamW (no weight decay) leaves every weight alone."""
    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[constant_reward], lr=1e-2)
    before = snapshot(unwrap(tr))
    stats = tr.train_step()
    assert stats["reward/std"] == 0 and stats["advantage/mean"] == 0
    assert changed(before, snapshot(unwrap(tr))) == set()


def first_group_constant(prompts, completions, **_):
    """Reward 1 for every sample of the step's first prompt (a group with advantage 0 under
    RLOO), the varied reward for the rest."""
    varied = varied_reward(prompts, completions)
    return [1.0 if p == prompts[0] else v for p, v in zip(prompts, varied)]


def test_skipping_zero_advantage_rows_gives_the_same_update(tiny_lm_dir, tmp_path):
    """Rows with advantage 0 everywhere are left out of the backward pass; the step is the same."""
    after, fracs = {}, {}
    for skip in (False, True):
        tr = make_trainer(tiny_lm_dir, tmp_path / str(skip), reward_fns=[first_group_constant], lr=1e-3,
                          skip_zero_advantage=skip, dynamic_sampling=False)
        stats = tr.train_step()
        assert stats["reward/std"] > 0
        after[skip], fracs[skip] = snapshot(unwrap(tr)), stats["perf/trained_frac"]
    assert fracs == {False: 1.0, True: 0.5}  # 2 prompts x 4 samples: the first group was skipped
    for name, p in after[False].items():
        torch.testing.assert_close(after[True][name], p, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_zero_advantage_rows_are_trained_when_another_loss_term_needs_them(tiny_lm_dir, tmp_path):
    for kw in ({"entropy_coef": 0.01}, {"baseline": "value"}, {"kl_coef": 0.1, "kl_in": "loss"}):
        tr = make_trainer(tiny_lm_dir, tmp_path / "x", reward_fns=[constant_reward], **kw)
        assert tr.train_step()["perf/trained_frac"] == 1.0, kw


def test_lora_trains_the_adapter_only_and_saves_it_alone(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, lora_r=4, lr=1e-2, max_steps=2, save_model=True)
    before = snapshot(unwrap(tr))
    lora = {n for n in before if "lora_" in n}
    assert lora and {n for n, p in unwrap(tr).named_parameters() if p.requires_grad} == lora
    summary = tr.train()
    after = snapshot(unwrap(tr))
    moved = changed(before, after)
    assert moved and moved <= lora  # adapter weights moved ...
    assert {n for n in moved if "lora_B" in n}  # (B starts at 0, so it moves first)
    base = set(before) - lora
    assert not (moved & base)  # ... and not one base weight did
    assert summary["train/steps"] == 2

    ckpt = tmp_path / "checkpoint-last"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_config.json" in files
    assert files & {"adapter_model.safetensors", "adapter_model.bin"}
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    assert (ckpt / "trainer_state.pt").exists() and (ckpt / "tokenizer.json").exists()

    # the saved adapter reproduces the trained policy over a fresh copy of the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), ckpt).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unwrap(tr).lm.eval()(input_ids=ids).logits)


# ---------------------------------------------------------------- KL to the reference


@pytest.mark.parametrize("lora_r", [0, 4], ids=["frozen-copy", "lora-adapter-disabled"])
@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_kl_is_zero_before_the_first_update(tiny_lm_dir, tmp_path, lora_r, kl_in):
    tr = make_trainer(tiny_lm_dir, tmp_path, kl_coef=0.1, kl_in=kl_in, kl_estimator="k3" if kl_in == "loss" else "k1",
                      lora_r=lora_r, lr=3e-2, temperature=0.8)
    assert (tr.ref is None) == (lora_r > 0)
    first = tr.train_step()
    assert abs(first["kl/ref"]) < 1e-5
    if kl_in == "loss":
        assert abs(first["loss/kl"]) < 1e-5
    # ... and the metric is live: after updates the policy has drifted from the reference
    tr.train_step()
    third = tr.train_step()
    assert third["kl/ref"] > 1e-4 if kl_in == "loss" else abs(third["kl/ref"]) > 1e-4


# ---------------------------------------------------------------- estimators and baselines


def test_gae_with_ppo_clipping_logs_value_and_clip_metrics(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, estimator="gae", ppo_epochs=2, num_minibatches=2, clip_low=0.2,
                      lr=3e-2, gae_lambda=0.9, vf_coef=0.5)
    assert tr.cfg.clip_high == 0.2
    vh = unwrap(tr).value_head
    assert vh is not None
    before = snapshot(vh)
    stats = tr.train_step()
    for key in ("loss/value", "value/explained_var", "policy/clip_frac", "loss/policy", "policy/approx_kl_k3"):
        assert key in stats and math.isfinite(stats[key]), key
    assert stats["loss/value"] > 0
    assert 0.0 <= stats["policy/clip_frac"] <= 1.0
    assert stats["policy/approx_kl_k3"] > 0  # later minibatches saw a policy that had already moved
    assert changed(before, snapshot(vh)) == {"weight", "bias"}  # the critic learned


def test_value_baseline_under_reinforce(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, estimator="reinforce", baseline="value", lr=1e-2)
    before = snapshot(unwrap(tr).value_head)
    stats = tr.train_step()
    assert stats["loss/value"] > 0 and "value/explained_var" in stats
    assert changed(before, snapshot(unwrap(tr).value_head))


@pytest.mark.parametrize(
    "baseline, extra",
    [("none", {}), ("batch_mean", {}), ("group_mean", {}), ("loo", {}), ("group_mean", {"scale_rewards": True}),
     ("loo", {"whiten_advantages": True, "loss_agg": "seq-mean-token-mean"}),
     ("loo", {"loss_agg": "seq-mean-token-sum-norm", "entropy_coef": 0.01, "micro_batch_size": 3})],
    ids=["none", "batch_mean", "group_mean", "loo", "group_mean-scaled", "loo-whiten-seqmean", "loo-dr-grpo-micro"],
)
def test_every_baseline_runs_a_step(tiny_lm_dir, tmp_path, baseline, extra):
    tr = make_trainer(tiny_lm_dir, tmp_path, baseline=baseline, lr=1e-2, **extra)
    before = snapshot(unwrap(tr))
    stats = tr.train_step()
    assert unwrap(tr).value_head is None
    assert math.isfinite(stats["loss/policy"]) and math.isfinite(stats["advantage/mean"])
    assert changed(before, snapshot(unwrap(tr)))


# ---------------------------------------------------------------- bad input


def test_empty_dataset_is_a_clear_error(tiny_lm_dir, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tiny_lm_dir, tmp_path, train_dataset=prompt_dataset([]))


def test_dataset_without_prompt_column(tiny_lm_dir, tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="'prompt' column"):
        make_trainer(tiny_lm_dir, tmp_path, train_dataset=Dataset.from_dict({"question": ["a", "b"]}))


@pytest.mark.parametrize(
    "kw, fragment",
    [({"lr": -1.0}, "--lr"), ({"max_steps": 0}, "--max-steps"), ({"kl_coef": -0.1}, "--kl-coef"),
     ({"kl_estimator": "k1", "kl_in": "loss", "kl_coef": 0.1}, "k1"), ({"kl_target": 1.0}, "--kl-target"),
     ({"baseline": "loo", "samples_per_prompt": 1}, "--samples-per-prompt"),
     ({"scale_rewards": True, "baseline": "loo"}, "--scale-rewards"),
     ({"prompts_per_step": 3, "samples_per_prompt": 2, "num_minibatches": 4}, "--num-minibatches"),
     ({"micro_batch_size": 0}, "--micro-batch-size"), ({"gamma": 1.5}, "--gamma"),
     ({"samples_every": 0}, "--samples-every"), ({"top_k": -1}, "--top-k"), ({"max_grad_norm": -1.0}, "--max-grad-norm"),
     ({"clip_low": -0.2}, "--clip-low")],
)
def test_config_rejects_bad_combinations(tiny_lm_dir, tmp_path, kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace("-", r"\-")):
        make_config(tiny_lm_dir, tmp_path, **kw)


def test_config_normalises_off_values(tiny_lm_dir, tmp_path):
    assert make_config(tiny_lm_dir, tmp_path, max_grad_norm=0.0).max_grad_norm is None  # 0 = off, as in gym
    cfg = make_config(tiny_lm_dir, tmp_path, clip_low=0.2)
    assert cfg.clip_high == 0.2 and cfg.reuses_rollout is False and cfg.uses_value_head is False


def test_dynamic_sampling_is_on_by_default_where_it_applies(tiny_lm_dir, tmp_path):
    assert make_config(tiny_lm_dir, tmp_path).dynamic_sampling is True
    assert make_config(tiny_lm_dir, tmp_path, samples_per_prompt=1, baseline="none").dynamic_sampling is False
    assert make_config(tiny_lm_dir, tmp_path, env="guess").dynamic_sampling is False  # episodes: one group per game
    assert make_config(tiny_lm_dir, tmp_path).with_env("guess").dynamic_sampling is False  # an env passed to train()
    with pytest.raises(ValueError, match="--dynamic-sampling is not supported with episodes"):
        make_config(tiny_lm_dir, tmp_path, env="guess", dynamic_sampling=True)  # given: kept, and refused
    with pytest.raises(ValueError, match="--dynamic-sampling needs --samples-per-prompt >= 2"):
        make_config(tiny_lm_dir, tmp_path, samples_per_prompt=1, baseline="none", dynamic_sampling=True)


def test_reward_error_surfaces_from_a_training_step(tiny_lm_dir, tmp_path):
    def returns_too_few(prompts, completions, **_):
        return [0.0]

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[returns_too_few])
    from pg_lm.lm import RewardError

    with pytest.raises(RewardError, match="returns_too_few.*1 values for 8 completions"):
        tr.train_step()


# ---------------------------------------------------------------- smaller features


def test_overlong_penalty_hits_truncated_completions_only(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[constant_reward], overlong_penalty=-0.5, max_new_tokens=3)
    stats = tr.train_step()
    assert stats["completion/truncated_frac"] > 0
    assert stats["reward/mean"] == pytest.approx(1.0 - 0.5 * stats["completion/truncated_frac"], abs=1e-6)
    assert stats["reward/constant_reward"] == pytest.approx(1.0)  # the per-function metric is the task's own


def test_max_seconds_stops_training_but_evaluates_and_saves(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=50, max_seconds=0.0, eval_dataset=prompt_dataset(["a", "b"]),
                      eval_size=2)
    summary = tr.train()
    assert summary["train/steps"] == 0
    assert {"eval/reward_before", "eval/reward_after"} <= set(summary)
    assert (tmp_path / "checkpoint-last" / "trainer_state.pt").exists()


def test_evaluation_reports_the_weighted_total_and_each_function(tiny_lm_dir, tmp_path):
    def reward(prompts, completions, **_):  # named like the total: must not be counted twice
        return [1.0] * len(completions)

    def half(prompts, completions, **_):
        return [0.5] * len(completions)

    tr = make_trainer(tiny_lm_dir, tmp_path, reward_fns=[reward, half], reward_weights=[1.0, 2.0], eval_size=3,
                      eval_batch_size=2)  # two chunks: the sampling context is entered twice
    tr.eval_ds = prompt_dataset(["a", "bb", "ccc", "dddd"])
    out = tr.evaluate()  # greedy, over the first eval_size = 3 rows, in chunks of 2
    assert {k: out[k] for k in ("eval/reward", "eval/half", "eval/accuracy")} == pytest.approx(
        {"eval/reward": 2.0, "eval/half": 0.5, "eval/accuracy": 1.0})  # accuracy: total reward >= 1


@pytest.mark.parametrize("lora_r", [0, 4])
def test_another_architecture_trains(tiny_gpt2_dir, tmp_path, lora_r):
    """GPT-2 (absolute positions, Conv1D layers) through the same loop, with a value head and KL."""
    tr = make_trainer(tiny_gpt2_dir, tmp_path, lora_r=lora_r, estimator="gae", kl_coef=0.05, lr=1e-2)
    before = snapshot(unwrap(tr))
    first = tr.train_step()
    assert abs(first["kl/ref"]) < 1e-5 and first["loss/value"] > 0
    assert changed(before, snapshot(unwrap(tr)))


@pytest.mark.parametrize(
    "kw",
    [dict(samples_per_prompt=1, baseline="none"),
     dict(prompts_per_step=1, samples_per_prompt=2, micro_batch_size=1),
     dict(samples_per_prompt=4, num_minibatches=2, clip_low=0.2),
     dict(estimator="gae", whiten_advantages=True, value_clip=0.2, ppo_epochs=2),
     dict(temperature=0.7, ppo_epochs=2, clip_low=0.1, clip_high=0.3, top_k=5, top_p=0.9),
     dict(kl_coef=0.1, kl_estimator="k2"),
     dict(lora_r=2, lora_target_modules=["q_proj", "v_proj"]),
     dict(chat_template=False, max_new_tokens=1),
     dict(warmup_steps=3, entropy_coef=0.1, loss_agg="seq-mean-token-mean")],
    ids=["G1", "micro1", "minibatches", "gae-whiten-vclip", "sampling-knobs", "kl-k2", "lora-targets", "no-chat-1tok",
         "warmup-entropy"],
)
def test_configurations_run_with_finite_metrics(tiny_lm_dir, tmp_path, kw):
    tr = make_trainer(tiny_lm_dir, tmp_path, lr=1e-2, **kw)
    before = snapshot(unwrap(tr))
    for _ in range(2):
        stats = tr.train_step()
    bad = {k: v for k, v in stats.items() if not math.isfinite(v)}
    assert not bad
    assert changed(before, snapshot(unwrap(tr)))


def test_adaptive_kl_moves_the_coefficient(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, kl_coef=0.1, kl_target=1.0, kl_horizon=10.0, lr=1e-2)
    first = tr.train_step()  # KL 0 < target: the coefficient shrinks (by at most 20% x n / horizon)
    assert first["kl/coef"] == pytest.approx(0.1 * (1 - 0.2 * 8 / 10.0))


def test_eval_every_logs_held_out_reward(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, max_steps=2, eval_every=1, log_every=2,
                      eval_dataset=prompt_dataset(["a", "b"]), eval_size=2)
    tr.train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    # before training, every step (logged with that step's row even off the log_every grid), after training
    assert [(r["step"], "eval/reward" in r, "reward/mean" in r) for r in rows] == [
        (0, True, False), (1, True, True), (2, True, True), (2, True, False)]


def test_tensorboard_tracker_gets_the_metrics(tiny_lm_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tiny_lm_dir, tmp_path, max_steps=2, report_to="tensorboard", save_model=False).train()
    tags = set()
    for events in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        if "reward/mean" in acc.Tags()["scalars"]:
            assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    assert {"reward/mean", "loss/policy", "perf/tokens_per_s"} <= tags


def test_lr_schedules_warm_up_then_decay_to_zero():
    from pg_lm.lm.setup import lr_factor

    assert [lr_factor("constant", p, 5, 2) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    assert [lr_factor("linear", p, 5, 0) for p in (0.0, 0.25, 1.0, 1.5)] == [1.0, 0.75, 0.0, 0.0]
    assert lr_factor("cosine", 0.5, 5, 0) == pytest.approx(0.5) and lr_factor("cosine", 1.0, 5, 0) == pytest.approx(0.0)
    assert [lr_factor("cosine", 0.9, s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # warm-up comes first


def test_linear_schedule_follows_the_steps_of_the_run(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, lr=1e-3, max_steps=4, lr_schedule="linear")
    lrs = [tr.train_step()["lr"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.75, 1e-3 * 0.5])  # step k runs at 1 - k / max_steps


def test_a_time_budget_drives_the_schedule_when_it_is_further_along(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, lr=1e-3, max_steps=1000, max_seconds=100.0, lr_schedule="linear")
    tr.state.prior_wall_s = 50.0  # as if half the time budget had gone (e.g. before a resume)
    tr.train_step()
    assert tr.train_step()["lr"] == pytest.approx(0.5e-3, rel=0.05)
