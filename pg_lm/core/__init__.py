"""The estimator core shared by the language-model and Gymnasium backends."""

from .advantages import (
    batch_mean_baseline,
    discounted_returns,
    gae,
    group_mean_baseline,
    group_std,
    last_step_mask,
    leave_one_out_baseline,
    remax_baseline,
    zero_spread_groups,
)
from .correction import SAMPLER_CORRECTIONS, sampler_is_weights, sampler_log_ratio
from .losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    aggregate,
    approx_kl,
    clip_fractions,
    entropy_from_logits,
    kl_estimate,
    log_ratio,
    policy_loss,
    value_loss,
)
from .metrics import explained_variance, pass_at_k
from .masked import masked_mean, masked_sum, masked_var, masked_whiten
from .natural import (
    assign_flat,
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    gaussian_kl,
    natural_gradient_step,
    step_scale,
)
from .turns import spread_over_turns, turn_advantages, turn_gae, turn_index, turn_returns
from .variance import debiased_snr, gradient_moments, gradient_summary, welford_update

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "RATIO_LEVELS", "SAMPLER_CORRECTIONS", "aggregate", "approx_kl",
    "batch_mean_baseline", "clip_fractions", "discounted_returns", "entropy_from_logits", "explained_variance", "gae", "group_mean_baseline", "group_std",
    "kl_estimate", "last_step_mask", "leave_one_out_baseline", "log_ratio", "masked_mean", "masked_sum",
    "masked_var", "masked_whiten", "pass_at_k", "policy_loss", "remax_baseline", "sampler_is_weights", "sampler_log_ratio", "value_loss",
    "zero_spread_groups",
    # credit over episodes of many turns
    "spread_over_turns", "turn_advantages", "turn_gae", "turn_index", "turn_returns",
    # the natural-gradient (TRPO) step
    "assign_flat", "backtracking_line_search", "categorical_kl", "conjugate_gradient", "fisher_vector_product",
    "flat_grad", "gaussian_kl", "natural_gradient_step", "step_scale",
    # gradient-estimator moments (pg-lm variance)
    "debiased_snr", "gradient_moments", "gradient_summary", "welford_update",
]
