"""The language-model backend: a Hugging Face causal LM as the policy."""

from .config import LMConfig
from .rewards import RewardError, RewardModel, RewardSet
from .rollout import Rollout
from .train import train

__all__ = ["LMConfig", "RewardError", "RewardModel", "RewardSet", "Rollout", "train"]
