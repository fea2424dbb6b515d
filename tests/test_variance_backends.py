"""pg-lm variance on both backends: the LM estimators' gradients are the trainer's own (the
gradient an optimizer step would get), exact identities between estimators on the same samples,
a checkpoint (adapter, gym policy.pt) measured, and bad input as one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from lm_fixtures import make_trainer, prompt_dataset, varied_reward
from pg_lm.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

TINY = dict(prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6, mixed_precision="no", lora_r=0,
            progress=False, seed=0)


def test_the_measured_gradient_is_the_one_the_trainer_steps_with(tiny_lm_dir, tmp_path):
    """Trainer.rollout_loss's gradient on a rollout equals what update() hands the optimizer."""
    from pg_lm.lm.variance import policy_gradients

    tr = make_trainer(tiny_lm_dir, tmp_path, baseline="loo", max_grad_norm=None, micro_batch_size=3)
    batch, _ = tr.rollout()
    ours = policy_gradients(tr, batch, ["loo"])["loo"]
    seen = []
    tr.opt.step = lambda *a, **k: seen.append(torch.cat([p.grad.reshape(-1) for p in tr.params]).double())
    tr.update(batch, *tr.advantages(batch))
    assert len(seen) == 1 and ours.norm() > 0
    torch.testing.assert_close(ours, seen[0], rtol=1e-5, atol=1e-7)


def test_lm_variance_of_every_estimator_from_the_same_samples(tiny_lm_dir, tmp_path):
    """Exact identities on the same batches: leave-one-out = G/(G-1) x group mean (per batch, so
    the variance scales by (G/(G-1))² and the SNR is equal); the value baseline of a fresh (zero)
    value head is no baseline; the reference's cosine is there; the files are written."""
    from pg_lm.lm.variance import DEFAULT_ESTIMATORS, VarianceConfig, run_variance

    cfg = VarianceConfig(model=tiny_lm_dir, **TINY, batches=3, reference_batches=2, output_dir=str(tmp_path / "var"))
    result, table = run_variance(cfg, reward_fns=[varied_reward], train_dataset=prompt_dataset())
    res, G = result["results"], 4
    assert list(res) == DEFAULT_ESTIMATORS and len(table.splitlines()) == 2 + len(DEFAULT_ESTIMATORS)
    assert all(r["variance"] > 0 and r["mean_norm"] > 0 and -1 <= r["cosine"] <= 1 for r in res.values())
    assert res["loo"]["variance"] == pytest.approx((G / (G - 1)) ** 2 * res["group_mean"]["variance"], rel=1e-6)
    assert res["loo"]["snr"] == pytest.approx(res["group_mean"]["snr"], rel=1e-6)
    assert res["value"] == pytest.approx(res["none"], rel=1e-9)
    assert res["gae"]["variance"] != pytest.approx(res["none"]["variance"], rel=1e-3)  # λ < 1 discounts early tokens
    saved = json.loads((tmp_path / "var" / "variance.json").read_text())
    assert saved["backend"] == "lm" and saved["batches"] == 3 and saved["trainable_params"] > 0
    assert (tmp_path / "var" / "variance.png").exists()


def test_lm_variance_of_the_credit_modes_of_episodes(tiny_lm_dir, tmp_path):
    """With --env every credit mode is measured on the same episodes: episode-level RLOO, per-turn
    returns (over episodes, over the turn index), GAE over action tokens; a single-completion
    estimator with --env (or a credit mode without) is refused in one line."""
    from pg_lm.lm.variance import EPISODE_ESTIMATORS, VarianceConfig, run_variance

    (tmp_path / "env.py").write_text(
        "class Varied:\n"
        "    def reset(self, *, seed, row=None):\n"
        "        self.k = 0\n"
        "        return f'start {seed}'\n"
        "    def step(self, action):\n"
        "        self.k += 1\n"
        "        return f't{self.k}', float(sum(map(ord, action)) % 5) / 4, self.k >= 3, False, {}\n")
    env = f"{tmp_path / 'env.py'}:Varied"
    cfg = VarianceConfig(model=tiny_lm_dir, **TINY, env=env, max_turns=3, batches=3, reference_batches=1,
                         output_dir=str(tmp_path / "var"))
    result, table = run_variance(cfg)
    res = result["results"]
    assert list(res) == EPISODE_ESTIMATORS and result["env"] == env and result["reference"] == "episode"
    assert all(r["variance"] > 0 and r["mean_norm"] > 0 for r in res.values())
    assert res["turn"]["variance"] != pytest.approx(res["episode"]["variance"], rel=1e-3)  # later turns: less return
    for bad in (dict(env="guess", estimators=["loo"]), dict(estimators=["turn"])):
        with pytest.raises(ValueError, match="with --env compare the credit modes"):
            VarianceConfig(model=tiny_lm_dir, **TINY, **bad)


def test_remax_is_measured_on_a_rollout_with_greedy_rows(tiny_lm_dir, tmp_path):
    """ReMax's baseline is the greedy completion's reward: a rollout of its own, shared with the
    estimators that need nothing more; with a value head it is refused."""
    from pg_lm.lm.variance import VarianceConfig, run_variance

    cfg = VarianceConfig(model=tiny_lm_dir, **TINY, batches=3, reference_batches=0, estimators=["remax", "none"],
                         output_dir=str(tmp_path / "var"))
    res = run_variance(cfg, reward_fns=[varied_reward], train_dataset=prompt_dataset())[0]["results"]
    assert res["remax"]["variance"] > 0 and res["remax"]["variance"] != pytest.approx(res["none"]["variance"], rel=1e-3)
    with pytest.raises(ValueError, match="need different rollouts"):
        bad = VarianceConfig(model=tiny_lm_dir, **TINY, batches=2, reference_batches=0, estimators=["remax", "gae"],
                             output_dir=str(tmp_path / "bad"))
        run_variance(bad, reward_fns=[varied_reward], train_dataset=prompt_dataset())


def test_one_rollout_serves_every_estimator_unless_their_rollouts_differ(monkeypatch):
    from pg_lm.lm import variance

    assert variance.trainer_baseline(["none", "loo"]) == "none"
    assert variance.trainer_baseline(["loo", "gae"]) == "value"
    extra = variance.Estimator("reinforce", "none", rollout_baseline="extra")  # a baseline with rows of its own
    monkeypatch.setitem(variance.ESTIMATORS, "extra", extra)
    assert variance.trainer_baseline(["none", "extra"]) == "extra"
    with pytest.raises(ValueError, match=r"^--estimators extra, value need different rollouts"):
        variance.trainer_baseline(["extra", "value", "loo"])


def test_lm_variance_of_a_trained_adapter_from_the_command_line(tiny_lm_dir, tmp_path, capsys):
    """--adapter: a LoRA adapter folder (adapter_config.json naming its base) merged, then measured."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lm.save_pretrained(tmp_path / "adapter")
    rc = cli(["variance", "--adapter", str(tmp_path / "adapter"), "--task", "counting", "--batches", "2",
              "--reference-batches", "0", "--estimators", "none", "loo", "--prompts-per-step", "2",
              "--samples-per-prompt", "2", "--max-new-tokens", "4", "--mixed-precision", "no", "--lora-r", "2",
              "--progress", "false", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0 and "| none |" in out and "| loo |" in out and "cos(" not in out
    saved = json.loads((tmp_path / "out" / "variance.json").read_text())
    assert saved["adapter"] == str(tmp_path / "adapter") and saved["lora_r"] == 2


@pytest.mark.parametrize("argv,fragment", [
    (["--batches", "1"], "--batches must be >= 2"),
    (["--adapter", "no/such/run"], "--adapter no/such/run: no such folder"),
    (["--baseline", "loo"], "--baseline: pg-lm variance compares estimators; name them with --estimators"),
    (["--env", "CartPole-v1", "--estimators", "nope"], "invalid choice: 'nope'"),
    (["--env", "CartPole-v1", "--batches", "1"], "--batches must be >= 2"),
    (["--env", "CartPole-v1", "--policy", "no/such/policy.pt"], "--policy no/such/policy.pt: no such file"),
    (["--env", "NoSuchEnv-v0"], "unknown environment 'NoSuchEnv-v0'"),
    (["--env", "guess", "--estimators", "loo"], "with --env compare the credit modes"),  # a text env: the LM backend
])
def test_bad_variance_input_is_one_line_exit_2(argv, fragment, tiny_lm_dir, tmp_path, capsys):
    argv = ["variance", *argv, "--output-dir", str(tmp_path)]
    if "--env" not in argv:
        argv += ["--model", tiny_lm_dir, "--mixed-precision", "no"]
    try:
        rc = cli(argv)
    except SystemExit as e:  # flag parsing and config validation exit through argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and fragment in err and len(err.splitlines()) == 1, err


def test_gym_variance_of_every_method_and_of_a_saved_policy(tmp_path, capsys):
    """CartPole: every method's row from the same episodes; a saved policy.pt of the same weights
    measures the same numbers; a policy without a critic is refused for the methods that need one."""
    from pg_lm.gym.algos import ALGOS
    from pg_lm.gym.policy import save_policy
    from pg_lm.gym.train import _setup
    from pg_lm.gym.variance import GymVarianceConfig, method_configs, run_gym_variance

    kw = dict(env="CartPole-v1", batches=3, reference_batches=2, n_steps=20, num_envs=2, progress=False)
    fresh, table = run_gym_variance(GymVarianceConfig(**kw, output_dir=str(tmp_path / "a")))
    assert list(fresh["results"]) == list(ALGOS) and len(table.splitlines()) == 2 + len(ALGOS)
    assert all(r["variance"] > 0 and r["cosine"] > 0 for r in fresh["results"].values())
    assert fresh["episodes"] > 0 and (tmp_path / "a" / "variance.png").exists()
    cfgs = method_configs(GymVarianceConfig(**kw), ["reinforce-baseline"])
    torch.manual_seed(0)
    envs, policy = _setup(cfgs["reinforce-baseline"], ALGOS["a2c"])  # as a fresh measurement builds it
    envs.close()
    save_policy(policy, tmp_path / "policy.pt", {})
    loaded, _ = run_gym_variance(GymVarianceConfig(**kw, policy=str(tmp_path), output_dir=str(tmp_path / "b")))
    assert loaded["results"] == fresh["results"]
    no_critic = tmp_path / "plain"
    no_critic.mkdir()
    envs, plain = _setup(cfgs["reinforce-baseline"], ALGOS["reinforce"])
    envs.close()
    save_policy(plain, no_critic / "policy.pt", {})
    rc = cli(["variance", "--env", "CartPole-v1", "--policy", str(no_critic), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has no critic" in err and len(err.splitlines()) == 1


def test_gym_variance_of_method_variants_named_as_rows(tmp_path):
    """``rows`` measures variants of a method (here REINFORCE with raw returns beside its whitened default):
    the raw row's gradient is, by hand, that of -mean_t log π(a_t|s_t) G_t; the whitened row's that of the
    whitened returns; both from the same episodes."""
    from pg_lm.core import discounted_returns, masked_whiten
    from pg_lm.gym.algos import ALGOS
    from pg_lm.gym.rollout import Collector
    from pg_lm.gym.train import _setup
    from pg_lm.gym.variance import GymVarianceConfig, method_configs, policy_gradients, run_gym_variance
    from pg_lm.gym.trpo import actor_params

    rows = {"raw": dict(algo="reinforce", whiten_advantages=False), "whitened": dict(algo="reinforce")}
    kw = dict(env="CartPole-v1", batches=3, reference_batches=2, n_steps=20, num_envs=2, progress=False,
              reference="raw")
    measured, table = run_gym_variance(GymVarianceConfig(**kw, output_dir=str(tmp_path)), rows=rows)
    assert list(measured["results"]) == ["raw", "whitened"] and "| raw |" in table and "| whitened |" in table
    assert measured["methods"]["raw"] == dict(algo="reinforce", gamma=0.99, gae_lambda=0.95, whiten_advantages=False,
                                              entropy_coef=0.0)
    assert measured["methods"]["whitened"]["whiten_advantages"] is True
    assert measured["results"]["raw"]["variance"] != measured["results"]["whitened"]["variance"]

    cfg = GymVarianceConfig(**kw)
    cfgs = method_configs(cfg, list(rows), rows)
    torch.manual_seed(0)
    envs, policy = _setup(cfgs["raw"], ALGOS["a2c"])
    try:
        batch = Collector(envs, policy, 0).collect(20, complete=True)
    finally:
        envs.close()
    got = policy_gradients(policy, batch, list(rows), cfgs)
    G = discounted_returns(batch.rewards, batch.mask, 0.99, batch.terminated, batch.truncated)  # (B, T)
    for name, adv in (("raw", G), ("whitened", masked_whiten(G, batch.mask))):
        logp = policy.evaluate(batch.obs.flatten(0, 1), batch.actions.flatten(0, 1))[0].view_as(G)
        loss = -(logp * adv.detach() * batch.mask).sum() / batch.mask.sum()
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, actor_params(policy))]).double()
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-7)
