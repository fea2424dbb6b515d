"""The loss variants through the trainer and the command line: presets (--loss-type) and their bad
combinations, the sampler's log-probs and their correction, DAPO's dynamic sampling, GSPO and the
metrics of each step. The formulas themselves: tests/test_core_variants.py; global whitening over
2 processes: tests/test_lm_variants_distributed.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, read_jsonl, varied_reward
from pg_lm.cli import main
from pg_lm.lm import LMConfig
from pg_lm.lm.presets import PRESETS
from pg_lm.run.config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread


# ----------------------------------------------------------------------- presets and bad input


@pytest.mark.parametrize("argv, fragment", [
    (["--loss-type", "gspo", "--ratio-level", "token"],
     "--loss-type gspo sets --ratio-level sequence; --ratio-level token contradicts it"),
    (["--loss-type", "dr_grpo", "--scale-rewards", "true"],
     "--loss-type dr_grpo sets --scale-rewards false; --scale-rewards true contradicts it"),
    (["--loss-type", "rloo", "--baseline", "group_mean"], "--loss-type rloo sets --baseline loo; --baseline group_mean"),
    (["--loss-type", "dapo", "--dynamic-sampling", "false"], "--loss-type dapo sets --dynamic-sampling true"),
    (["--ratio-level", "sequence", "--estimator", "gae"], "--ratio-level sequence (GSPO) has one advantage per completion"),
    (["--loss-type", "gspo", "--baseline", "value"], "--loss-type gspo sets --baseline group_mean; --baseline value"),
    (["--clip-ratio-c", "1"], "--clip-ratio-c must be > 1"),
    (["--dynamic-sampling", "--samples-per-prompt", "1", "--baseline", "none"],
     "--dynamic-sampling needs --samples-per-prompt >= 2"),
    (["--max-sampling-rounds", "-1"], "--max-sampling-rounds must be >= 0"),
    (["--sampler-is-cap", "0.5"], "--sampler-is-cap must be >= 1"),
])
def test_bad_combinations_exit_2_in_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lm", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_expands_to_its_flags_and_tunables_stay_overridable(name):
    p = PRESETS[name]
    cfg = LMConfig(loss_type=name)
    for k, v in {**p.defining, **p.tunable}.items():
        assert getattr(cfg, k) == v, (name, k)
    if "clip_high" in p.tunable:
        assert LMConfig(loss_type=name, clip_high=0.5).clip_high == 0.5
    # the same from flags
    flags = parse_config(LMConfig, ["--loss-type", name])
    assert flags == cfg


def test_a_given_flag_equal_to_the_default_still_contradicts():
    # --ratio-level token is pg_lm's default: only knowing it was given tells it from no flag at all
    with pytest.raises(ValueError, match="--loss-type gspo sets --ratio-level sequence; --ratio-level token"):
        LMConfig(loss_type="gspo", ratio_level="token")
    assert LMConfig(loss_type="gspo").ratio_level == "sequence"
    assert LMConfig(loss_type="gspo", ratio_level="sequence").ratio_level == "sequence"  # agreeing: fine


def test_a_scripts_defaults_give_way_to_a_preset_but_flags_do_not(capsys):
    recipe = dict(baseline="loo", samples_per_prompt=8, clip_high=None)  # as recipes/arithmetic.py passes them
    cfg = parse_config(LMConfig, ["--loss-type", "dapo"], **recipe)
    assert cfg.baseline == "group_mean" and cfg.clip_high == 0.28 and cfg.samples_per_prompt == 8
    assert parse_config(LMConfig, [], **recipe).baseline == "loo"
    with pytest.raises(SystemExit):
        parse_config(LMConfig, ["--loss-type", "dapo", "--baseline", "loo"], prog="pg-lm lm", **recipe)
    assert "--loss-type dapo sets --baseline group_mean; --baseline loo contradicts it" in capsys.readouterr().err


def test_a_preset_from_a_config_file_names_the_contradiction(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("loss_type: dr_grpo\nloss_agg: token-mean\n")
    with pytest.raises(SystemExit):
        parse_config(LMConfig, ["--config", str(f)], prog="pg-lm lm")
    assert "--loss-type dr_grpo sets --loss-agg seq-mean-token-sum-norm; --loss-agg token-mean" in capsys.readouterr().err


def test_the_cli_prints_and_saves_the_expansion(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import pg_lm.tasks

    ds = prompt_dataset()
    monkeypatch.setitem(pg_lm.tasks.TASKS, "arithmetic", lambda num_eval=100, seed=0: (ds, ds, [varied_reward]))
    code = main(["lm", "--model", tiny_lm_dir, "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-size", "2",
                 "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "4", "--progress", "false",
                 "--save-model", "false", "--loss-type", "dapo", "--clip-high", "0.3", "--mixed-precision", "no"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--loss-type dapo (Yu et al. 2025, DAPO): --estimator reinforce --baseline group_mean" in out
    assert "overridden: --clip-high 0.3" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["loss_type"] == "dapo" and config["dynamic_sampling"] is True and config["clip_high"] == 0.3
    assert config["preset"]["overridden"] == {"clip_high": 0.3} and config["preset"]["sets"]["clip_low"] == 0.2


# ----------------------------------------------------------------------- the sampler's log-probs


def _captured_update(tr, batch, adv):
    """The gradient ``tr.update`` would step with (the optimizer step replaced by a copy of it)."""
    named = [(n, p) for n, p in tr.policy.named_parameters() if p.requires_grad]
    got = {}
    tr.opt.step = lambda *a, **k: got.update({n: p.grad.detach().clone() for n, p in named})
    stats, _ = tr.update(batch, adv, None)
    return got, stats


@pytest.mark.parametrize("cpu_layer", ["off", "on"])
def test_the_sampler_log_probs_are_the_learners_when_both_run_fp32(tiny_lm_dir, tmp_path, cpu_layer):
    tr = make_trainer(tiny_lm_dir, tmp_path, cpu_layer=cpu_layer, prompts_per_step=4)
    batch, _ = tr.rollout()
    learner = tr.forward(batch, grad=False)[0]  # (B, T)
    m = batch.completion_mask.bool()
    assert batch.sampler_logp.shape == learner.shape and (batch.sampler_logp[~m] == 0).all()
    torch.testing.assert_close(batch.sampler_logp[m], learner[m], rtol=0, atol=1e-4)
    stats = tr.train_step()
    assert stats["sampler/logp_gap"] < 1e-4 and stats["sampler/logp_gap_max"] < 1e-3 and abs(stats["sampler/kl"]) < 1e-6


@pytest.mark.parametrize("mode, level, factor", [
    ("tis", "token", 1.5),  # ρ = 2 on every token, capped at 1.5
    ("tis", "sequence", 1.5),  # ρ = 2^length > 1.5
    ("mask", "token", 0.0),  # every token over the cap: masked out
])
def test_the_correction_weighs_each_tokens_gradient(tiny_lm_dir, tmp_path, mode, level, factor):
    tr = make_trainer(tiny_lm_dir, tmp_path / "a", max_grad_norm=None, skip_zero_advantage=False)
    batch, _ = tr.rollout()
    adv, _ = tr.advantages(batch)
    assert adv.abs().sum() > 0
    batch.sampler_logp = (tr.forward(batch, grad=False)[0] - math.log(2.0)) * batch.completion_mask  # ρ = 2
    plain, stats = _captured_update(tr, batch, adv)
    assert abs(stats["sampler/logp_gap"] - math.log(2.0)) < 1e-4 and "sampler/is_weight" not in stats
    tr.cfg = dataclasses.replace(tr.cfg, sampler_correction=mode, sampler_is_cap=1.5, sampler_is_level=level)
    corrected, stats = _captured_update(tr, batch, adv)
    assert stats["sampler/is_capped_frac"] == pytest.approx(1.0)
    assert stats["sampler/is_weight"] == pytest.approx(factor)
    for name, g in plain.items():
        torch.testing.assert_close(corrected[name], factor * g, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_a_nonfinite_sampler_log_prob_skips_the_update(tiny_lm_dir, tmp_path, monkeypatch):
    import pg_lm.lm.trainer as trainer_module

    real = trainer_module.sample

    def sample(*a, **kw):
        b = real(*a, **kw)
        b.sampler_logp = b.sampler_logp + float("nan")
        return b
    monkeypatch.setattr(trainer_module, "sample", sample)
    tr = make_trainer(tiny_lm_dir, tmp_path)
    stats = tr.train_step()
    assert stats["health/skipped_steps"] == 1


# ----------------------------------------------------------------------- DAPO's dynamic sampling


def _by_kind(prompts, completions, kind, **_):
    """1 for every sample of a 'flat' prompt (no spread); varied for the others."""
    vary = varied_reward(prompts, completions)
    return [1.0 if k == "flat" else v for k, v in zip(kind, vary)]


def _ds_trainer(tiny_lm_dir, out, kinds, **kw):
    prompts = ["ab", "cde", "f", "ghij", "kl", "mnopq", "r", "stu"]
    ds = prompt_dataset(prompts, kind=kinds)
    return make_trainer(tiny_lm_dir, out, reward_fns=(_by_kind,), train_dataset=ds, dynamic_sampling=True,
                        prompts_per_step=2, samples_per_prompt=4, **kw)


def test_dynamic_sampling_keeps_informative_groups_only(tiny_lm_dir, tmp_path):
    kinds = ["flat", "vary"] * 4
    tr = _ds_trainer(tiny_lm_dir, tmp_path, kinds, max_sampling_rounds=8)
    for _ in range(3):
        batch, stats = tr.rollout()
        assert len(batch.prompts) == 8 and batch.completion_ids.shape[0] == 8
        assert set(batch.columns["kind"]) == {"vary"}, batch.columns["kind"]
        g = batch.scores.view(-1, 4)
        assert ((g.amax(1) - g.amin(1)) > 0).all()
        assert stats["sampling/cap_reached"] == 0.0 and stats["sampling/filler_frac"] == 0.0
        assert 0.0 <= stats["reward/zero_spread_frac"] <= 1.0
        # the batch's log-probs are the learner's for the rows it kept
        m = batch.completion_mask.bool()
        torch.testing.assert_close(batch.sampler_logp[m], tr.forward(batch, grad=False)[0][m], rtol=0, atol=1e-4)
        tr.step += 1


def test_dynamic_sampling_draws_the_same_prompts_and_samples_again(tiny_lm_dir, tmp_path):
    kinds = ["flat", "vary"] * 4
    a = _ds_trainer(tiny_lm_dir, tmp_path / "a", kinds)
    b = _ds_trainer(tiny_lm_dir, tmp_path / "b", kinds)
    out = []
    for tr in (a, b):  # the same step from the same random state (as a resumed run restores it)
        tr.step = 5
        torch.manual_seed(7)
        out.append(tr.rollout())
    (ba, sa), (bb, sb) = out
    assert ba.prompts == bb.prompts and torch.equal(ba.completion_ids, bb.completion_ids)
    assert {k: v for k, v in sa.items() if not k.startswith("perf/")} == {k: v for k, v in sb.items() if not k.startswith("perf/")}
    assert a.prompts(5, 2) == b.prompts(5, 2) and a.prompts(5, 2)[0] != a.prompts(5, 1)[0]


def test_dynamic_sampling_at_its_cap_warns_and_trains_on_what_it_has(tiny_lm_dir, tmp_path, capsys):
    tr = _ds_trainer(tiny_lm_dir, tmp_path, ["flat"] * 8, max_sampling_rounds=2)
    stats = tr.train_step()
    out = capsys.readouterr().out
    assert "step 1: dynamic sampling is 2 informative group(s) short after --max-sampling-rounds 2" in out
    assert stats["sampling/rounds"] == 2 and stats["sampling/cap_reached"] == 1.0 and stats["sampling/filler_frac"] == 1.0
    assert stats["reward/zero_spread_frac"] == 1.0
    assert stats["perf/trained_frac"] == 0.0  # every group filler, advantage 0: nothing to train on
    assert stats["health/skipped_steps"] == 0


# ----------------------------------------------------------------------- GSPO, dual-clip and the metrics


def test_gspo_on_policy_has_grpos_gradient_and_differs_off_policy(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, loss_type="grpo", max_grad_norm=None, clip_low=None, clip_high=None)
    batch, _ = tr.rollout()
    adv, _ = tr.advantages(batch)
    grpo, _ = _captured_update(tr, batch, adv)
    base = dataclasses.replace(tr.cfg, loss_type=None)
    tr.cfg = dataclasses.replace(base, ratio_level="sequence")
    gspo, _ = _captured_update(tr, batch, adv)
    for name in grpo:  # ratio 1 on every token and sequence: the same gradient
        torch.testing.assert_close(gspo[name], grpo[name], rtol=1e-4, atol=1e-7)
    # off policy (π_old moved): the sequence ratio weighs each completion by s_i, the token ratio each token
    batch.logp = tr.forward(batch, grad=False)[0] + 0.3 * torch.randn_like(adv) * batch.completion_mask
    gspo_off, _ = _captured_update(tr, batch, adv)
    tr.cfg = base
    grpo_off, _ = _captured_update(tr, batch, adv)
    assert not torch.allclose(gspo_off["lm.lm_head.weight"], grpo_off["lm.lm_head.weight"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["gspo", "dr_grpo", "bnpo", "reinforce_pp", "reinforce_pp_baseline", "rloo"])
def test_each_preset_trains_with_finite_metrics(tiny_lm_dir, tmp_path, loss_type):
    tr = make_trainer(tiny_lm_dir, tmp_path, loss_type=loss_type, max_steps=2, num_minibatches=2, clip_ratio_c=3.0,
                      kl_coef=0.05 if loss_type.startswith("reinforce_pp") else 0.0)
    before = {n: p.detach().clone() for n, p in tr.policy.named_parameters()}
    tr.train()
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 2
    for r in rows:
        for k in ("policy/clip_frac_low", "policy/clip_frac_high", "policy/clip_frac_dual", "reward/zero_spread_frac",
                  "policy/entropy", "policy/entropy_sampled", "sampler/logp_gap", "sampler/logp_gap_max", "sampler/kl",
                  "completion/length", "completion/length_max", "completion/truncated_frac"):
            assert k in r and math.isfinite(r[k]), (loss_type, k)
        assert r["completion/length_max"] >= r["completion/length"]
        assert r["health/skipped_steps"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in tr.policy.named_parameters())
