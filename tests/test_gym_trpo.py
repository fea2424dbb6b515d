"""TRPO on the Gymnasium backend: one update on a real rollout keeps the measured KL within
--max-kl and improves the surrogate, a rejected step restores the actor, only the critic
regresses, bad flags fail in one line, and short runs go end to end."""

from __future__ import annotations

import json

import pytest
import torch

import pg_lm.core.natural as natural
import pg_lm.gym.trpo as trpo
from pg_lm.cli import main as cli_main
from pg_lm.gym import ALGOS, ActorCritic, Collector, GymConfig, make_envs, resolve, train
from pg_lm.gym.algos import update
from pg_lm.gym.policy import policy_spec


def _batch(env: str, seed: int = 0, **overrides):
    """A resolved TRPO config, a fresh policy and one rollout of 2 envs x 256 steps with its GAE."""
    cfg = resolve(GymConfig(env=env, algo="trpo", num_envs=2, n_steps=256, progress=False, **overrides))
    torch.manual_seed(seed)
    envs = make_envs(env, cfg.num_envs)
    spec = policy_spec(envs.single_observation_space, envs.single_action_space, [32, 32], True, False, 0.0)
    policy = ActorCritic(spec)
    batch = Collector(envs, policy, seed).collect(cfg.n_steps)
    envs.close()
    adv, returns = ALGOS["trpo"].advantage(batch, cfg.gamma, cfg.gae_lambda)
    flat = dict(obs=batch.obs.flatten(0, 1), actions=batch.actions.flatten(0, 1), logp=batch.logp.reshape(-1),
                adv=adv.reshape(-1), mask=batch.mask.reshape(-1))
    return cfg, policy, batch, adv, returns, flat


def _dist(policy: ActorCritic, obs: torch.Tensor):
    """The policy as a torch.distributions object (an independent reference for the KL)."""
    out = policy.actor(obs)
    if policy.spec["action"] == "discrete":
        return torch.distributions.Categorical(logits=out)
    return torch.distributions.Independent(torch.distributions.Normal(out, policy.head.log_std.exp()), 1)


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


@pytest.mark.parametrize("env, max_kl", [("CartPole-v1", 0.01), ("CartPole-v1", 0.001), ("Pendulum-v1", 0.01)])
def test_one_update_stays_within_max_kl_and_improves_the_surrogate(env, max_kl):
    cfg, policy, _, _, _, flat = _batch(env, max_kl=max_kl)
    mask = flat["mask"]
    with torch.no_grad():
        before = _dist(policy, flat["obs"])
    critic = _flat(policy.critic)
    stats = trpo.natural_step(policy, flat, cfg)
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(before, _dist(policy, flat["obs"]))[mask].mean()
    assert stats["policy/step_fraction"] > 0, stats
    assert 0 < float(kl) <= max_kl * (1 + 1e-5), (float(kl), stats)
    assert float(kl) == pytest.approx(stats["policy/kl"], rel=1e-4), "the logged KL is the measured one"
    assert stats["policy/surrogate_gain"] > 0
    # the full step's quadratic KL is max_kl: an accepted step moves a real distance, not a sliver
    assert float(kl) > 0.1 * max_kl * stats["policy/step_fraction"] ** 2
    assert torch.equal(_flat(policy.critic), critic), "the natural step moves only the actor"


def test_the_line_search_backs_off_when_the_quadratic_model_overshoots(monkeypatch):
    # without damping, on a sharpened policy (final layer x3), the Fisher is near-singular and the
    # full step's real KL is far above max_kl: the search must shrink it until the KL fits
    cfg, policy, _, _, _, flat = _batch("CartPole-v1", cg_damping=0.0, line_search_steps=40)
    with torch.no_grad():
        policy.actor[-1].weight.mul_(3.0)
        flat["logp"] = policy.evaluate(flat["obs"], flat["actions"])[0]
        before = _dist(policy, flat["obs"])
    tried = []

    def spy(evaluate, max_kl, steps, ratio):
        return real(lambda f: tried.append((f, *evaluate(f))) or tried[-1][1:], max_kl, steps, ratio)

    real = natural.backtracking_line_search
    monkeypatch.setattr(natural, "backtracking_line_search", spy)
    stats = trpo.natural_step(policy, flat, cfg)
    with torch.no_grad():
        kl = float(torch.distributions.kl_divergence(before, _dist(policy, flat["obs"]))[flat["mask"]].mean())
    assert tried[0][0] == 1.0 and tried[0][2] > 10 * cfg.max_kl, "the full step overshoots"
    assert all(gain <= 0 or k > cfg.max_kl for _, gain, k in tried[:-1]), "each rejection had a reason"
    assert stats["policy/step_fraction"] == tried[-1][0] < 1.0
    assert tried[-1][1] > 0 and kl <= cfg.max_kl * (1 + 1e-5)


def test_a_rejected_step_restores_the_actor(monkeypatch):
    cfg, policy, _, _, _, flat = _batch("Pendulum-v1")
    actor = _flat(policy.actor), policy.head.log_std.detach().clone()
    tried = []

    def reject_all(evaluate, max_kl, steps, ratio):
        tried.append(evaluate(1.0))  # moves the parameters to the full step, then gives up
        return None

    monkeypatch.setattr(natural, "backtracking_line_search", reject_all)
    stats = trpo.natural_step(policy, flat, cfg)
    assert tried and tried[0][1] > 0, "the full step was really tried"
    assert stats["policy/step_fraction"] == 0.0 and stats["policy/kl"] == 0.0
    assert torch.equal(_flat(policy.actor), actor[0]) and torch.equal(policy.head.log_std.detach(), actor[1])


def test_update_fits_the_critic_with_its_own_adam_steps():
    cfg, policy, batch, adv, returns, _ = _batch("CartPole-v1", ppo_epochs=3, num_minibatches=4)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    critic = _flat(policy.critic)
    stats = update(policy, opt, batch, adv, returns, cfg, ALGOS["trpo"])
    assert not torch.equal(_flat(policy.critic), critic)
    stepped = {id(p) for p, s in opt.state.items() if s}
    assert stepped == {id(p) for p in policy.critic.parameters()}, "Adam never touches the actor"
    assert next(iter(opt.state[next(policy.critic.parameters())]["step"].reshape(1))) == 3 * 4
    assert {"loss/value", "policy/kl", "policy/step_fraction", "value/explained_var"} <= set(stats)
    assert "policy/clip_frac" not in stats


def test_resolve_uses_the_rl_zoo_rows():
    cart = resolve(GymConfig(env="CartPole-v1", algo="trpo"))
    assert (cart.num_envs, cart.n_steps, cart.gae_lambda, cart.cg_damping, cart.ppo_epochs) == (2, 512, 0.98, 1e-3, 20)
    assert (cart.max_kl, cart.line_search_steps, cart.backtrack_ratio) == (0.01, 10, 0.8)
    pend = resolve(GymConfig(env="Pendulum-v1", algo="trpo"))
    assert (pend.num_envs, pend.n_steps, pend.gamma, pend.ppo_epochs) == (2, 1024, 0.9, 15)
    assert resolve(GymConfig(env="Acrobot-v1", algo="trpo")).cg_iters == 10, "the flag default elsewhere"


@pytest.mark.parametrize("argv, match", [
    (["--max-kl", "0"], "max_kl must be > 0"),
    (["--max-kl", "-0.1"], "max_kl must be > 0"),
    (["--cg-iters", "0"], "cg_iters must be > 0"),
    (["--cg-damping", "-1"], "cg_damping must be >= 0"),
    (["--line-search-steps", "0"], "line_search_steps must be > 0"),
    (["--backtrack-ratio", "1.0"], "backtrack_ratio must be in (0, 1)"),
])
def test_bad_trpo_flags_are_one_line_errors(tmp_path, capsys, argv, match):
    code = cli_main(["gym", "--algo", "trpo", "--output-dir", str(tmp_path), "--progress", "false",
                     "--total-steps", "64", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and match in err, err


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_trpo_runs_end_to_end(tmp_path, env):
    summary = train(GymConfig(env=env, algo="trpo", total_steps=1024, n_steps=256, eval_episodes=2,
                              output_dir=str(tmp_path), progress=False))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["env_steps"] == 1024 and len(rows) == 2
    for r in rows:
        assert 0 <= r["policy/kl"] <= 0.01 * (1 + 1e-5) and r["loss/value"] == r["loss/value"]
    assert json.loads((tmp_path / "config.json").read_text())["max_kl"] == 0.01
