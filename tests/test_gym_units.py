"""Fast unit tests of the Gymnasium backend: rollout masks and bootstraps, heads, obs norm, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from pg_lm.core import gae
from pg_lm.gym import ActorCritic, Collector, GymConfig, RunningMeanStd, defaults_for, make_envs, resolve
from pg_lm.gym.algos import gae_advantage, mc_advantage, mc_baseline_advantage
from pg_lm.gym.policy import load_policy, policy_spec
from pg_lm.gym.rollout import Rollout


def _policy(envs, critic=True, obs_norm=False, log_std_init=0.0) -> ActorCritic:
    spec = policy_spec(envs.single_observation_space, envs.single_action_space, [16], critic, obs_norm,
                       log_std_init)
    return ActorCritic(spec)


# --- NEXT_STEP autoreset on real vector envs -------------------------------------------------


@pytest.mark.parametrize("mode", ["vector_entry_point", "sync"])
def test_step_after_episode_end_is_masked_reset_transition(mode):
    torch.manual_seed(0)
    envs = make_envs("CartPole-v1", 4, mode)
    collector = Collector(envs, _policy(envs), seed=0)
    # several short rollouts: an episode end in the last column must mask column 0 of the next one
    batches = [collector.collect(16) for _ in range(8)]
    envs.close()
    cat = lambda name: torch.cat([getattr(b, name) for b in batches], 1)
    obs, rewards, mask = cat("obs"), cat("rewards"), cat("mask")  # (B, T, 4), (B, T), (B, T)
    done = cat("terminated") | cat("truncated")
    assert done.sum() >= 8, "a random CartPole policy ends episodes within ~20 steps"
    T = mask.shape[1]
    for b, t in zip(*torch.nonzero(done[:, :-2], as_tuple=True)):
        assert not mask[b, t + 1], "the step after an episode end only resets the env"
        assert rewards[b, t + 1] == 0.0 and not done[b, t + 1]
        if cat("terminated")[b, t]:  # the stored obs after a termination is the final (failed) state
            x, theta = obs[b, t + 1, 0], obs[b, t + 1, 2]
            assert abs(x) > 2.4 or abs(theta) > 12 * 2 * math.pi / 360
        assert obs[b, t + 2].abs().max() <= 0.05, "the step after it starts from a fresh reset state"
    expected = torch.ones_like(mask)
    expected[:, 1:] = ~done[:, :-1]
    assert torch.equal(mask, expected[:, :T]), "exactly the steps after an episode end are masked"
    assert collector.steps == 4 * 16 * 8


class StubVecEnv(VectorEnv):
    """Deterministic episodes of 3 steps, obs = [steps into the episode]; episodes alternate
    between terminating and truncating. NEXT_STEP autoreset, as Gymnasium's vector envs."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1):
        self.num_envs = num_envs
        self.single_observation_space = spaces.Box(-10, 10, (1,), np.float32)
        self.single_action_space = spaces.Discrete(2)
        self.k = np.zeros(num_envs)
        self.episode = np.zeros(num_envs, int)
        self.prev_done = np.zeros(num_envs, bool)

    def reset(self, *, seed=None, options=None):
        self.k[:], self.prev_done[:] = 0, False
        return self.k[:, None].astype(np.float32), {}

    def step(self, actions):
        r = self.prev_done  # autoreset step: reset obs, reward 0, not done
        self.k = np.where(r, 0, self.k + 1)
        end = self.k >= 3
        term, trunc = end & (self.episode % 2 == 0), end & (self.episode % 2 == 1)
        self.episode += end
        self.prev_done = term | trunc
        reward = np.where(r, 0.0, 1.0)
        return self.k[:, None].astype(np.float32), reward, term, trunc, {}


def test_rollout_bootstraps_truncation_not_termination():
    torch.manual_seed(0)
    envs = StubVecEnv()
    policy = _policy(envs)
    batch = Collector(envs, policy, seed=0).collect(8)
    V = lambda k: float(policy.value(torch.tensor([[float(k)]])).detach())
    assert batch.terminated[0].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert batch.truncated[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    assert batch.mask[0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    # the stored obs after each episode end is the final observation [3]
    assert batch.next_values[0, 2] == pytest.approx(V(3)) and batch.next_values[0, 6] == pytest.approx(V(3))
    gamma = 0.9
    adv, ret = gae_advantage(batch, gamma, 0.0)  # λ = 0: the TD error, one step at a time
    v = batch.values[0]
    assert adv[0, 2] == pytest.approx(1.0 - float(v[2]), abs=1e-6), "no bootstrap after a termination"
    assert adv[0, 6] == pytest.approx(1.0 + gamma * V(3) - float(v[6]), abs=1e-6), "bootstrap on truncation"
    assert adv[0, 3] == 0 and adv[0, 7] == 0
    # Monte-Carlo returns: plain REINFORCE cuts the truncated episode at 0, the baseline variant bootstraps
    G, _ = mc_advantage(batch, gamma, 1.0)
    assert G[0, :3].tolist() == pytest.approx([1 + gamma + gamma**2, 1 + gamma, 1.0])
    assert G[0, 4:7].tolist() == pytest.approx([1 + gamma + gamma**2, 1 + gamma, 1.0])
    _, G_b = mc_baseline_advantage(batch, gamma, 1.0)
    assert G_b[0, 6] == pytest.approx(1.0 + gamma * V(3), abs=1e-6)
    assert G_b[0, 2] == pytest.approx(1.0)


def test_constructed_batch_matches_core_gae():
    """The rollout -> core call with hand-made flags: (B, T) layout and next_values reach gae."""
    r = Rollout(obs=torch.zeros(1, 4, 1), actions=torch.zeros(1, 4, dtype=torch.long), logp=torch.zeros(1, 4),
                values=torch.tensor([[1.0, 2.0, 3.0, 4.0]]), next_values=torch.tensor([[2.0, 10.0, 4.0, 5.0]]),
                rewards=torch.ones(1, 4), terminated=torch.tensor([[False, False, False, False]]),
                truncated=torch.tensor([[False, True, False, False]]), mask=torch.tensor([[True, True, False, True]]))
    adv, _ = gae_advantage(r, 0.5, 1.0)
    # t=3: 1 + .5*5 - 4; t=2 masked; t=1 truncated: 1 + .5*10 - 2; t=0: δ0 + .5*A1 = (1 + 1 - 1) + .5*4
    assert adv[0].tolist() == pytest.approx([3.0, 4.0, 0.0, -0.5])
    ref, _ = gae(r.rewards, r.values, r.mask, 0.5, 1.0, r.terminated, r.truncated, r.next_values)
    assert torch.equal(adv, ref)


def test_complete_episode_rollouts_keep_whole_episodes_started_before_cutoff():
    torch.manual_seed(1)
    envs = make_envs("CartPole-v1", 6)
    collector = Collector(envs, _policy(envs, critic=False), seed=1)
    for _ in range(3):
        b = collector.collect(20, complete=True)
        done = (b.terminated | b.truncated) & b.mask
        for row_mask, row_done in zip(b.mask, done):
            kept = torch.nonzero(row_mask).squeeze(-1)
            ends = torch.nonzero(row_done).squeeze(-1)
            assert len(ends) >= 1 and kept[-1] == ends[-1], "every kept episode ends inside the rollout"
            assert ends[-1] >= 19 and (len(ends) == 1 or ends[-2] < 19), "episodes starting after 20 steps dropped"
            starts = torch.cat([kept[:1], ends[:-1] + 2])  # +1 for the masked autoreset step
            assert int(row_mask.sum()) == int((ends - starts + 1).sum()), "no hole inside a kept episode"
        assert b.mask.shape[1] >= 20
    envs.close()


# --- heads, clipping, observation normalisation ---------------------------------------------


def test_categorical_head_matches_torch_distributions():
    torch.manual_seed(0)
    envs = make_envs("CartPole-v1", 2)
    policy = _policy(envs)
    envs.close()
    x, actions = torch.randn(32, 4), torch.randint(0, 2, (32,))
    logp, ent, _ = policy.evaluate(x, actions)
    ref = torch.distributions.Categorical(logits=policy.actor(x))
    assert torch.allclose(logp, ref.log_prob(actions), atol=1e-6)
    assert torch.allclose(ent, ref.entropy(), atol=1e-6)
    a, lp, _ = policy.act(x)
    assert torch.allclose(lp, ref.log_prob(a), atol=1e-6)
    assert torch.equal(policy.act(x, deterministic=True)[0], policy.actor(x).argmax(-1))


def test_gaussian_head_matches_torch_distributions_and_clips_env_actions():
    torch.manual_seed(0)
    envs = make_envs("Pendulum-v1", 2)
    policy = _policy(envs, log_std_init=1.5)  # std 4.5: many samples fall outside [-2, 2]
    envs.close()
    with torch.no_grad():
        policy.head.log_std.fill_(0.3)
    x, actions = torch.randn(64, 3), torch.randn(64, 1) * 3
    logp, ent, _ = policy.evaluate(x, actions)
    ref = torch.distributions.Normal(policy.actor(x), policy.head.log_std.exp())
    assert torch.allclose(logp, ref.log_prob(actions).sum(-1), atol=1e-5)
    assert torch.allclose(ent, ref.entropy().sum(-1), atol=1e-5)
    env_actions = policy.head.to_env(actions)
    assert env_actions.min() >= -2.0 and env_actions.max() <= 2.0
    inside = actions.abs() <= 2.0
    assert np.array_equal(env_actions[inside.numpy()], actions[inside].numpy())


def test_rollout_stores_unclipped_gaussian_samples():
    torch.manual_seed(0)
    envs = make_envs("Pendulum-v1", 2)
    policy = _policy(envs, log_std_init=1.5)
    batch = Collector(envs, policy, seed=0).collect(50)
    envs.close()
    assert batch.actions.shape == (2, 50, 1)
    assert batch.actions.abs().max() > 2.0, "the log-prob belongs to the unclipped sample"
    ref = torch.distributions.Normal(policy.actor(batch.obs), policy.head.log_std.exp())
    assert torch.allclose(batch.logp, ref.log_prob(batch.actions).sum(-1), atol=1e-5)


def test_running_mean_std_matches_numpy_and_survives_save(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal([1.0, -2.0, 5.0], [0.5, 2.0, 10.0], size=(1000, 3))
    rms = RunningMeanStd(3)
    for chunk in np.array_split(x, 37):
        rms.update(chunk)
    assert np.allclose(rms.mean.numpy(), x.mean(0), atol=1e-6)
    assert np.allclose(rms.var.numpy(), x.var(0), rtol=1e-4)
    z = rms.normalize(x)
    assert z.dtype == np.float32 and np.allclose(z.mean(0), 0, atol=1e-3) and np.allclose(z.std(0), 1, atol=1e-3)
    # the statistics travel in the state dict (policy.pt) and come back into the numpy views
    envs = make_envs("Pendulum-v1", 1)
    policy = _policy(envs, obs_norm=True)
    envs.close()
    policy.normalize(x, update=True)
    torch.save({"spec": policy.spec, "state_dict": policy.state_dict()}, tmp_path / "p.pt")
    loaded = load_policy(tmp_path / "p.pt")
    assert np.allclose(loaded.obs_rms.normalize(x[:5]), policy.obs_rms.normalize(x[:5]))
    assert torch.equal(loaded.normalize(x[:5]), policy.normalize(x[:5]))


def test_unsupported_spaces_are_rejected():
    box = spaces.Box(-1, 1, (3,))
    with pytest.raises(ValueError, match="flat Box"):
        policy_spec(spaces.Box(0, 255, (8, 8, 3)), spaces.Discrete(2), [8], True, False, 0.0)
    with pytest.raises(ValueError, match="flat Box"):
        policy_spec(spaces.Discrete(16), spaces.Discrete(4), [8], True, False, 0.0)
    with pytest.raises(ValueError, match="unsupported action space"):
        policy_spec(box, spaces.MultiDiscrete([2, 3]), [8], True, False, 0.0)
    with pytest.raises(ValueError, match="finite bounds"):
        policy_spec(box, spaces.Box(-np.inf, np.inf, (2,)), [8], True, False, 0.0)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=-5), "total_steps must be > 0"),
    (dict(env="NoSuchEnv-v0"), "unknown environment"),
    (dict(algo="sac"), "unknown algo"),
    (dict(gamma=1.5), "gamma must be in"),
    (dict(hidden=[]), "hidden"),
    (dict(num_envs=2, n_steps=2, num_minibatches=8), "num_minibatches"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GymConfig(**kwargs)


def test_resolve_fills_per_env_defaults_without_mutating():
    cfg = GymConfig(env="Pendulum-v1", algo="ppo", lr=5e-4)
    full = resolve(cfg)
    assert cfg.gamma is None and cfg.lr == 5e-4, "resolve returns a new config"
    assert full.lr == 5e-4, "a flag given by the user wins"
    assert full.gamma == defaults_for("Pendulum-v1", "ppo")["gamma"] == 0.95
    assert full.obs_norm is True and full.total_steps == defaults_for("Pendulum-v1", "ppo")["total_steps"]
    assert resolve(GymConfig(env="Acrobot-v1", algo="a2c")).n_steps == defaults_for("*", "a2c")["n_steps"]
    # an algorithm's row beats an env's generic row: A2C on Pendulum keeps A2C's short rollouts
    assert resolve(GymConfig(env="Pendulum-v1", algo="a2c")).n_steps == defaults_for("*", "a2c")["n_steps"]
    assert all(v is not None for k, v in vars(resolve(GymConfig())).items() if k != "target_return")
