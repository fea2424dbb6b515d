"""The natural-gradient step of TRPO (Schulman et al. 2015, "Trust Region Policy Optimization").

TRPO maximises the surrogate ``L(θ) = E[π_θ(a|s) / π_old(a|s) · A]`` subject to the mean
KL ``D̄(θ) = E_s[KL(π_old(·|s) || π_θ(·|s))] <= δ``. Linearising L (gradient g) and taking
the KL to second order (its Hessian at θ_old is the Fisher matrix F) gives the step

    x = F⁻¹ g                    conjugate gradient on Fisher-vector products, F never formed
    β = sqrt(2 δ / (xᵀ F x))     the largest step along x whose quadratic KL is δ
    θ = θ_old + f · β x          backtracking, f = 1, r, r², ...: the first f whose surrogate
                                 improves and whose measured mean KL is <= δ

These functions are the pieces, for any parameter list: the Gymnasium backend's MLP
policies and a language model's trainable weights alike. Shapes: P = the number of
scalar parameters (every vector here is flat, (P,)); N = a flat batch of states.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor


def flat_grad(scalar: Tensor, params: Sequence[Tensor], create_graph: bool = False,
              retain_graph: bool | None = None) -> Tensor:
    """``∂ scalar / ∂ params`` flattened to (P,); a parameter the scalar does not depend on
    gets zeros (e.g. a critic in the same list)."""
    if scalar.dim() != 0:
        raise ValueError(f"flat_grad needs a scalar, got shape {tuple(scalar.shape)}")
    grads = torch.autograd.grad(scalar, params, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])  # (P,)


def fisher_vector_product(kl: Callable[[], Tensor], params: Sequence[Tensor],
                          damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """``v -> (∇²_θ D̄ + damping · I) v`` by double backward (Pearlmutter's trick).

    ``kl()`` returns the scalar mean KL between a fixed (detached) rollout policy and the
    policy at the current ``params``. Evaluated where the two coincide, its Hessian is the
    Fisher information matrix of the policy (Schulman et al. 2015, Appendix C.1), so
    ``Hv = ∇_θ ((∇_θ D̄)ᵀ v)`` is a Fisher-vector product for two backward passes, never
    forming the (P, P) matrix. ``damping`` λ adds λ v: the sample Fisher is only positive
    semi-definite, and the damping keeps conjugate gradient stable.

    The first derivative is built once here; the returned callable (P,) -> (P,) reuses
    its graph on every call (one call per conjugate-gradient iteration).
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    params = list(params)
    grad_kl = flat_grad(kl(), params, create_graph=True)  # (P,), itself differentiable

    def fvp(v: Tensor) -> Tensor:
        if v.shape != grad_kl.shape:
            raise ValueError(f"vector has shape {tuple(v.shape)}, expected ({grad_kl.numel()},)")
        return flat_grad(grad_kl @ v.detach(), params, retain_graph=True) + damping * v  # (P,)

    return fvp


def conjugate_gradient(fvp: Callable[[Tensor], Tensor], g: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``F x = g`` for symmetric positive-definite F given only ``v -> F v``.

    Hestenes & Stiefel (1952), as TRPO uses it (Schulman et al. 2015, Appendix C): start
    at x = 0, at most ``iters`` iterations (each one ``fvp`` call), stop early once the
    squared residual ``‖g - F x‖²`` is below ``residual_tol``. With ``iters >= P`` it is
    exact up to rounding. g (P,) -> x (P,).
    """
    if g.dim() != 1:
        raise ValueError(f"g must be a flat vector (P,), got shape {tuple(g.shape)}")
    if iters < 1:
        raise ValueError(f"conjugate-gradient iterations must be >= 1, got {iters}")
    x = torch.zeros_like(g)  # (P,)
    r = g.clone()  # residual g - F x
    p = g.clone()  # search direction
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        fp = fvp(p)  # (P,)
        alpha = rr / (p @ fp)
        x = x + alpha * p
        r = r - alpha * fp
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def step_scale(x: Tensor, fx: Tensor, max_kl: float) -> float:
    """``β = sqrt(2 δ / (xᵀ F x))``: the step β x has quadratic KL ``½ β² xᵀ F x = δ``.

    ``x`` (P,) the search direction, ``fx`` (P,) its Fisher-vector product F x,
    ``max_kl`` δ > 0. A non-positive xᵀ F x (a degenerate direction) raises."""
    if x.shape != fx.shape or x.dim() != 1:
        raise ValueError(f"x and F x must be equal flat vectors (P,), got {tuple(x.shape)} and {tuple(fx.shape)}")
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    shs = float(x @ fx)
    if not shs > 0:  # also catches nan
        raise ValueError(f"xᵀ F x must be > 0 to scale the step, got {shs}")
    return math.sqrt(2.0 * max_kl / shs)


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], max_kl: float,
                             steps: int = 10, ratio: float = 0.8) -> float | None:
    """The largest fraction ``f ∈ {1, r, r², ..., r^(steps-1)}`` of the full step to accept.

    ``evaluate(f)`` puts the parameters at ``θ_old + f · full_step`` and returns
    ``(surrogate improvement L(θ) - L(θ_old), mean KL(π_old || π_θ))``. A fraction is
    accepted only when the improvement is finite and > 0 and the KL is <= ``max_kl``
    (Schulman et al. 2015, Appendix C: the quadratic model of the KL can be wrong, so the
    real KL is checked; an overflowing ratio must not pass as an infinite improvement).
    Returns the accepted fraction, or None when none of the ``steps`` fractions
    qualifies -- the caller then restores θ_old. The parameters are left where the last
    ``evaluate`` put them.
    """
    if steps < 1:
        raise ValueError(f"line-search steps must be >= 1, got {steps}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"backtrack ratio must be in (0, 1), got {ratio}")
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    fraction = 1.0
    for _ in range(steps):
        improvement, kl = evaluate(fraction)
        if 0 < improvement < math.inf and kl <= max_kl:  # nan fails both comparisons
            return fraction
        fraction *= ratio
    return None


@torch.no_grad()
def assign_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write the flat vector (P,) into ``params`` in place (an optimizer's state stays attached)."""
    i = 0
    for p in params:
        p.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def natural_gradient_step(before: Tensor, surrogate: Callable[[], Tensor], mean_kl: Callable[[], Tensor],
                          params: Sequence[Tensor], max_kl: float, cg_iters: int = 10, damping: float = 0.1,
                          line_search_steps: int = 10, backtrack_ratio: float = 0.8,
                          reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """TRPO's whole step on ``params`` (the module docstring's four lines), moving them in place.

    ``before``: the surrogate L at θ_old with its graph (its gradient is g); ``surrogate()`` and
    ``mean_kl()`` evaluate L and the mean KL(π_old || π_θ) at the current parameters (the KL
    differentiably: its Hessian gives the Fisher-vector products). Returns ``policy/kl`` (the
    measured mean KL after the step), ``policy/surrogate_gain``, ``policy/step_fraction`` (0 =
    rejected: θ stays θ_old) and ``policy/grad_norm`` (‖g‖; non-finite g: no step). A zero g (e.g.
    every advantage 0) leaves θ where it is.

    ``reduce`` (several processes, each holding a share of the batch and a replica of θ): a sum over
    processes that gives every process the same result. ``before``, ``surrogate()`` and
    ``mean_kl()`` are then this process's share (normalised by the global counts), and g, each
    Fisher-vector product (before the damping), L and the KL are summed: every process solves the
    same system and takes the same step.
    """
    params = list(params)
    total = reduce or (lambda t: t)
    g = total(flat_grad(before, params))  # (P,)
    stats = {"policy/kl": 0.0, "policy/surrogate_gain": 0.0, "policy/step_fraction": 0.0,
             "policy/grad_norm": float(g.norm())}
    if not math.isfinite(stats["policy/grad_norm"]) or stats["policy/grad_norm"] == 0.0:
        return stats
    local = fisher_vector_product(mean_kl, params)  # this process's share of F v, undamped

    def fvp(v: Tensor) -> Tensor:
        return total(local(v)) + damping * v  # (P,)

    x = conjugate_gradient(fvp, g, cg_iters)  # (P,) ≈ (F + λI)⁻¹ g
    fx = fvp(x)
    if not float(x @ fx) > 0:  # no direction to step in
        return stats
    full = step_scale(x, fx, max_kl) * x  # (P,)
    theta_old = torch.cat([p.detach().reshape(-1) for p in params])  # (P,)
    base, last = float(total(before.detach())), {}

    @torch.no_grad()
    def evaluate(fraction: float) -> tuple[float, float]:
        assign_flat(params, theta_old + fraction * full)
        value, kl = total(torch.stack([surrogate().detach(), mean_kl().detach()])).tolist()  # one reduction
        last.update({"policy/surrogate_gain": value - base, "policy/kl": kl})
        return last["policy/surrogate_gain"], last["policy/kl"]

    fraction = backtracking_line_search(evaluate, max_kl, line_search_steps, backtrack_ratio)
    if fraction is None:
        assign_flat(params, theta_old)
        return stats
    # the search returns at the accepted point, so the parameters and `last` are that point's
    return dict(stats, **last, **{"policy/step_fraction": fraction})


def categorical_kl(old_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(p_old || p) = Σ_a p_old(a) (log p_old(a) - log p(a))`` per state.

    Exact, over the whole action set. (N, A), (N, A) -> (N,)."""
    if old_logits.shape != logits.shape:
        raise ValueError(f"shape mismatch: old_logits {tuple(old_logits.shape)}, logits {tuple(logits.shape)}")
    old_logp = torch.log_softmax(old_logits, -1)
    return (old_logp.exp() * (old_logp - torch.log_softmax(logits, -1))).sum(-1)  # (N,)


def gaussian_kl(old_mean: Tensor, old_log_std: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """KL between diagonal Gaussians ``N(μ_old, σ_old²) || N(μ, σ²)`` per state, summed over dims:

        Σ_i [ log σ_i - log σ_old,i + (σ_old,i² + (μ_old,i - μ_i)²) / (2 σ_i²) - ½ ]

    means (N, A); log-stds (A,) (state-independent, as the Gymnasium policies have) or
    (N, A). -> (N,)."""
    if old_mean.shape != mean.shape:
        raise ValueError(f"shape mismatch: old_mean {tuple(old_mean.shape)}, mean {tuple(mean.shape)}")
    var_ratio = torch.exp(2.0 * (old_log_std - log_std))  # σ_old² / σ²
    t = ((old_mean - mean) * torch.exp(-log_std)) ** 2  # (μ_old - μ)² / σ²
    return (log_std - old_log_std + 0.5 * (var_ratio + t) - 0.5).sum(-1)  # (N,)
