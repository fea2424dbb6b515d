"""MLP actor-critic for flat observations: a Categorical or a Gaussian action head.

Separate actor and critic MLPs (tanh, orthogonal init: hidden gain √2, actor output
0.01, critic output 1, zero biases), as in CleanRL's ``ppo.py`` / SB3's ``MlpPolicy``.
Heads are written out instead of using ``torch.distributions``: the rollout calls them
once per environment step, and the distribution objects' argument validation costs
more than the tiny MLPs themselves. Their log-probs are tested against
``torch.distributions`` in tests/test_gym_units.py.

Shapes: N = any flat batch (a rollout's B·T, or B envs at one step), D observation
size, A number of discrete actions or continuous action dimensions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from pg_lm.core import categorical_kl, entropy_from_logits, gaussian_kl

LOG_2PI = math.log(2.0 * math.pi)


class RunningMeanStd(nn.Module):
    """Running mean / variance (Chan et al.'s parallel update, as SB3's ``VecNormalize``).

    The statistics are float64 buffers, so they are saved in the state dict; the
    methods work on numpy views of those buffers because they run once per env step,
    where a dozen tiny torch ops would cost more than the policy's forward pass."""

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip, self.eps = clip, eps
        self.frozen = False  # True: update() leaves the statistics as they are (a fixed policy: pg-lm variance)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))  # SB3's prior count
        # views sharing memory with the buffers (load_state_dict copies in place, keeping them valid)
        self._mean, self._var, self._count = self.mean.numpy(), self.var.numpy(), self.count.numpy()

    def update(self, x: np.ndarray) -> None:
        """Fold a batch ``x`` (N, D) into the statistics."""
        n = x.shape[0]
        if n == 0 or self.frozen:
            return
        mean, var = x.mean(0), x.var(0)
        delta, total = mean - self._mean, self._count + n
        m2 = self._var * self._count + var * n + delta**2 * self._count * n / total
        self._mean += delta * n / total
        self._var[...] = m2 / total
        self._count[...] = total

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``clip((x - mean) / sqrt(var + eps), ±clip)`` as float32. (N, D) -> (N, D)."""
        z = (x - self._mean) / np.sqrt(self._var + self.eps)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)


class Categorical(nn.Module):
    """Discrete actions: the actor outputs logits (N, A); actions are int64 (N,)."""

    def __init__(self, n: int):
        super().__init__()
        self.out_dim = n

    def sample(self, logits: Tensor) -> Tensor:
        return torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)  # (N,)

    def mode(self, logits: Tensor) -> Tensor:
        return logits.argmax(-1)  # (N,)

    def log_prob(self, logits: Tensor, actions: Tensor) -> Tensor:
        return torch.log_softmax(logits, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)  # (N,)

    def entropy(self, logits: Tensor) -> Tensor:
        return entropy_from_logits(logits)  # (N,)

    def snapshot(self, logits: Tensor) -> tuple[Tensor, ...]:
        """The distribution's parameters, detached: the fixed ``old`` side of :meth:`kl`."""
        return (logits.detach(),)

    def kl(self, old: tuple[Tensor, ...], logits: Tensor) -> Tensor:
        """Exact ``KL(π_old || π)`` per state (N,), differentiable in ``logits``."""
        return categorical_kl(old[0], logits)

    def to_env(self, actions: Tensor) -> np.ndarray:
        return actions.numpy()


class Gaussian(nn.Module):
    """Continuous actions: the actor outputs the mean (N, A); the log-std is one
    state-independent parameter (A,). Samples are unclipped (their log-prob is what the
    loss uses); only the copy sent to the environment is clipped to the bounds."""

    def __init__(self, low: np.ndarray, high: np.ndarray, log_std_init: float = 0.0):
        super().__init__()
        self.out_dim = int(np.prod(low.shape))
        self.log_std = nn.Parameter(torch.full((self.out_dim,), float(log_std_init)))
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)

    def sample(self, mean: Tensor) -> Tensor:
        return mean + self.log_std.exp() * torch.randn_like(mean)  # (N, A)

    def mode(self, mean: Tensor) -> Tensor:
        return mean

    def log_prob(self, mean: Tensor, actions: Tensor) -> Tensor:
        z = (actions - mean) * torch.exp(-self.log_std)
        return (-0.5 * z**2 - self.log_std - 0.5 * LOG_2PI).sum(-1)  # (N,)

    def entropy(self, mean: Tensor) -> Tensor:
        return (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(mean.shape[0])  # (N,)

    def snapshot(self, mean: Tensor) -> tuple[Tensor, ...]:
        """The distribution's parameters (mean (N, A), log-std (A,)), detached: the fixed
        ``old`` side of :meth:`kl`."""
        return mean.detach(), self.log_std.detach().clone()

    def kl(self, old: tuple[Tensor, ...], mean: Tensor) -> Tensor:
        """Exact ``KL(π_old || π)`` per state (N,), differentiable in ``mean`` and the log-std."""
        return gaussian_kl(old[0], old[1], mean, self.log_std)

    def to_env(self, actions: Tensor) -> np.ndarray:
        return np.clip(actions.numpy(), self.low, self.high)


def mlp(sizes: list[int], out_gain: float) -> nn.Sequential:
    """tanh MLP with orthogonal init; the last layer has gain ``out_gain`` and no activation."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        lin = nn.Linear(a, b)
        nn.init.orthogonal_(lin.weight, out_gain if last else math.sqrt(2.0))
        nn.init.zeros_(lin.bias)
        layers += [lin] if last else [lin, nn.Tanh()]
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Actor MLP -> action head; critic MLP -> V(s) (absent for plain REINFORCE).

    ``spec`` (plain data) is all that is needed to rebuild the module: see :func:`load_policy`.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        obs_dim, hidden = spec["obs_dim"], list(spec["hidden"])
        if spec["action"] == "discrete":
            self.head: Categorical | Gaussian = Categorical(spec["n"])
        else:
            self.head = Gaussian(np.array(spec["low"]), np.array(spec["high"]), spec["log_std_init"])
        self.actor = mlp([obs_dim, *hidden, self.head.out_dim], out_gain=0.01)
        self.critic = mlp([obs_dim, *hidden, 1], out_gain=1.0) if spec["critic"] else None
        self.obs_rms = RunningMeanStd(obs_dim) if spec["obs_norm"] else None

    def normalize(self, obs: np.ndarray, update: bool = False) -> Tensor:
        """Raw observations (N, D) -> the network's float32 input (N, D)."""
        if self.obs_rms is None:
            return torch.as_tensor(obs, dtype=torch.float32)
        if update:
            self.obs_rms.update(obs)
        return torch.from_numpy(self.obs_rms.normalize(obs))

    def value(self, x: Tensor) -> Tensor:
        """V(s) (N,); zeros without a critic."""
        return self.critic(x).squeeze(-1) if self.critic is not None else x.new_zeros(x.shape[0])

    def act(self, x: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sample (or take the mode of) the policy at normalised obs ``x`` (N, D):
        ``(actions, logp (N,), values (N,))``."""
        out = self.actor(x)
        actions = self.head.mode(out) if deterministic else self.head.sample(out)
        return actions, self.head.log_prob(out, actions), self.value(x)

    def evaluate(self, x: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logp (N,), entropy (N,), values (N,))`` of given actions, with gradients."""
        out = self.actor(x)
        return self.head.log_prob(out, actions), self.head.entropy(out), self.value(x)


def policy_spec(obs_space, action_space, hidden: list[int], critic: bool, obs_norm: bool,
                log_std_init: float) -> dict:
    """The plain-data description of a policy for these (single-env) spaces.

    Raises ValueError for spaces this MLP cannot handle (images, dict, MultiDiscrete...)."""
    from gymnasium import spaces

    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"observations must be a flat Box (D,); got {obs_space} (images, dict and "
                         "discrete observations need a different encoder)")
    spec = dict(obs_dim=int(obs_space.shape[0]), hidden=list(hidden), critic=critic, obs_norm=obs_norm)
    if isinstance(action_space, spaces.Discrete):
        if action_space.start != 0:
            raise ValueError(f"Discrete actions must start at 0; got {action_space}")
        return dict(spec, action="discrete", n=int(action_space.n))
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
            raise ValueError(f"Box actions need finite bounds to clip to; got {action_space}")
        return dict(spec, action="continuous", low=action_space.low.tolist(),
                    high=action_space.high.tolist(), log_std_init=log_std_init)
    raise ValueError(f"unsupported action space {action_space}: use Discrete (Categorical head) "
                     "or a flat Box (Gaussian head)")


def save_policy(policy: ActorCritic, path, config: dict) -> None:
    """Write ``policy.pt``: the spec, the weights with the obs-norm statistics, the run's config."""
    torch.save({"spec": policy.spec, "state_dict": policy.state_dict(), "config": config}, path)


def load_policy(path) -> ActorCritic:
    """Rebuild the policy saved as ``policy.pt`` by a run (weights and obs-norm statistics)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    policy = ActorCritic(blob["spec"])
    policy.load_state_dict(blob["state_dict"])
    return policy.eval()
