"""The estimator core shared by the language-model and Gymnasium backends."""

from .advantages import (
    batch_mean_baseline,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_std,
    last_step_mask,
    leave_one_out_baseline,
)
from .losses import AGG_MODES, KL_ESTIMATORS, aggregate, entropy_from_logits, kl_estimate, policy_loss, value_loss
from .metrics import pass_at_k
from .masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "aggregate", "batch_mean_baseline", "discounted_returns",
    "entropy_from_logits", "gae", "group_mean_baseline", "group_std", "kl_estimate",
    "last_step_mask", "leave_one_out_baseline", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "pass_at_k", "policy_loss", "value_loss",
]
