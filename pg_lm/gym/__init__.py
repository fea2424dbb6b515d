"""Gymnasium classic-control backend: MLP policies, vector-env rollouts, one trainer.

>>> from pg_lm.gym import GymConfig, train
>>> summary = train(GymConfig(env="CartPole-v1", algo="ppo", total_steps=100_000))  # doctest: +SKIP
"""

from .algos import ALGOS, Algo, update
from .config import DEFAULTS, GymConfig, defaults_for, resolve
from .envs import evaluate, make_envs
from .policy import ActorCritic, Categorical, Gaussian, RunningMeanStd, load_policy, policy_spec
from .rollout import Collector, RewardScaler, Rollout
from .train import UsageError, describe, main, parse_args, train

__all__ = [
    "ALGOS", "ActorCritic", "Algo", "Categorical", "Collector", "DEFAULTS", "Gaussian", "GymConfig",
    "RewardScaler", "Rollout", "RunningMeanStd", "UsageError", "defaults_for", "describe", "evaluate", "load_policy",
    "main", "make_envs", "parse_args", "policy_spec", "resolve", "train", "update",
]
