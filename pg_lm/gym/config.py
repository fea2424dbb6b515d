"""The classic-control trainer's configuration: one flat dataclass, one flag per field.

Hyper-parameters default to ``None``, meaning "the per-env / per-algorithm default",
resolved once by :func:`resolve` from the :data:`DEFAULTS` table. A row of the table is
keyed ``(env, algo)`` with ``"*"`` as a wildcard; lookups go from the most specific key
to the least: ``(env, algo)``, ``("*", algo)``, ``(env, "*")``, ``("*", "*")`` -- so an
algorithm's structure (rollout length, epochs) beats an env's generic row, which holds
what belongs to the env (horizon γ, scaling, budget). A flag given by the user always
wins. The resolved config is what ``config.json`` records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pg_lm.run.config import arg, check_trpo, rename_aliases

ALGO_NAMES = ("reinforce", "reinforce-baseline", "a2c", "ppo", "trpo")
VECTOR_MODES = ("auto", "vector_entry_point", "sync")

# Why these numbers (tuned for env steps first, then seconds, on a shared 2-core CPU; the
# steps are to a deterministic evaluation of >= 475, seeds 0-4 unless noted):
# * CartPole PPO: many cheap updates -- 16 envs x 32 steps, 8 epochs of 2 minibatches,
#   lr 3e-3 annealed, γ 0.98 / λ 0.8 (short effective horizon, low-variance advantages):
#   21-32k steps, 2-6 s. 4 epochs needed 47-97k; 4 minibatches or lr 2e-3 were slower.
# * CartPole A2C: 8 envs x 8 steps, lr 2e-3, γ 0.98 / λ 0.9: 20-54k steps (seeds 0-2).
# * REINFORCE: whole episodes per update, so short rollouts (4 envs, >= 200 steps each)
#   give more updates. With a baseline, reward scaling keeps V's targets O(1): with one
#   Adam step per rollout an unscaled critic cannot catch up with returns of ~100.
# * Pendulum: γ 0.95 (0.9 and log-std -0.5 stalled at -550 for 2 of 3 seeds), obs and
#   reward scaling, a small entropy bonus against early collapse of the log-std, and
#   16 minibatches (rl-zoo's 64 took 4x the time and stalled too): -250 at 61-74k steps
#   for seeds 0-7. gSDE (rl-zoo's choice) is left out.
# * TRPO: rl-zoo's trpo.yml (sb3-contrib's TRPO) row by row, so that benchmarks/cartpole.py
#   compares the two implementations at the same settings. Generic row: sb3-contrib's
#   defaults (one 2048-step batch from 2 envs, critic lr 1e-3 constant, 10 critic passes of
#   128-step minibatches, no gradient clip); the KL step itself is the flag defaults
#   (δ 0.01, 10 CG iterations, damping 0.1, 10 backtracking steps of 0.8).
#   CartPole: rl-zoo's row (2 x 512 steps, critic batch 512 = 2 minibatches, 20 critic passes,
#   damping 1e-3, λ 0.98, γ 0.99) and sb3-contrib's 15 CG iterations: 475 at 45-70k steps
#   (seeds 0-2). Pendulum: rl-zoo's row (2 x 1024 steps, γ 0.9, 15 critic passes, 15 CG
#   iterations) without its gSDE, no entropy bonus (rl-zoo has none); the Pendulum row's
#   obs and reward scaling stay: -300 at 51-61k steps (seeds 0-2; seed 0 without the scaling,
#   as rl-zoo runs it: 63k instead of 53k).
DEFAULTS: dict[tuple[str, str], dict] = {
    ("*", "*"): dict(
        total_steps=100_000, num_envs=8, n_steps=128, lr=3e-4, anneal_lr=True, gamma=0.99,
        gae_lambda=0.95, ppo_epochs=4, num_minibatches=4, clip=0.2, value_clip=0.0, entropy_coef=0.0,
        vf_coef=0.5, max_grad_norm=0.5, whiten_advantages=True, hidden=[64, 64], obs_norm=False,
        reward_norm=False, log_std_init=0.0,
        max_kl=0.01, cg_iters=10, cg_damping=0.1, line_search_steps=10, backtrack_ratio=0.8,
    ),
    ("*", "a2c"): dict(n_steps=8, lr=7e-4, whiten_advantages=False, ppo_epochs=1, num_minibatches=1),
    ("*", "reinforce"): dict(num_envs=4, n_steps=200, lr=1e-3, ppo_epochs=1, num_minibatches=1),
    ("*", "reinforce-baseline"): dict(
        num_envs=4, n_steps=200, lr=1e-3, ppo_epochs=1, num_minibatches=1, reward_norm=True,
    ),
    ("CartPole-v1", "ppo"): dict(
        num_envs=16, n_steps=32, lr=3e-3, gamma=0.98, gae_lambda=0.8, ppo_epochs=8, num_minibatches=2,
    ),
    ("CartPole-v1", "a2c"): dict(lr=2e-3, gamma=0.98, gae_lambda=0.9),
    ("CartPole-v1", "reinforce"): dict(total_steps=300_000, lr=3e-3),
    ("CartPole-v1", "reinforce-baseline"): dict(total_steps=300_000, lr=3e-3),
    ("Pendulum-v1", "*"): dict(
        total_steps=150_000, num_envs=4, gamma=0.95, entropy_coef=0.005, obs_norm=True, reward_norm=True,
    ),
    ("Pendulum-v1", "ppo"): dict(n_steps=1024, lr=1e-3, gae_lambda=0.95, ppo_epochs=10, num_minibatches=16),
    ("*", "trpo"): dict(
        num_envs=2, n_steps=1024, lr=1e-3, anneal_lr=False, ppo_epochs=10, num_minibatches=16,
        max_grad_norm=0.0,
    ),
    ("CartPole-v1", "trpo"): dict(
        total_steps=100_000, n_steps=512, gamma=0.99, gae_lambda=0.98, ppo_epochs=20, num_minibatches=2,
        cg_damping=1e-3, cg_iters=15,
    ),
    ("Pendulum-v1", "trpo"): dict(
        total_steps=100_000, gamma=0.9, ppo_epochs=15, num_minibatches=16, cg_iters=15, entropy_coef=0.0,
    ),
}


@dataclass
class GymConfig:
    """Policy gradients (REINFORCE, REINFORCE with baseline, A2C, PPO, TRPO) on Gymnasium vector envs.

    Flags left unset take the per-env / per-algorithm default (pg_lm/gym/config.py, DEFAULTS)."""

    # what to run
    env: str = arg("CartPole-v1", "Gymnasium env id (flat Box observations; Discrete or Box actions)")
    algo: str = arg("ppo", "policy-gradient algorithm", ALGO_NAMES)
    seed: int = arg(0, "random seed (initialisation, action sampling, environments)")
    total_steps: int | None = arg(None, "environment steps to train for (all envs together)")
    output_dir: str = arg("runs/gym", "where config, metrics, summary, plot and policy go")
    # rollout
    num_envs: int | None = arg(None, "parallel environments")
    n_steps: int | None = arg(None, "steps per env per rollout (REINFORCE: at least; episodes in progress then run to their end)")
    vector_mode: str = arg("auto", "vectorisation: auto = the env's native vector version when it has one, else sync", VECTOR_MODES)
    # estimator
    gamma: float | None = arg(None, "discount factor")
    gae_lambda: float | None = arg(None, "GAE λ (a2c, ppo, trpo)")
    whiten_advantages: bool | None = arg(None, "whiten advantages to mean 0, std 1 (PPO: per minibatch, where the LM "
                                          "backend whitens the whole batch; REINFORCE: whitens the returns)")
    # optimisation
    lr: float | None = arg(None, "Adam learning rate (TRPO: the critic's)")
    anneal_lr: bool | None = arg(None, "decay the learning rate linearly to 0 over total_steps")
    ppo_epochs: int | None = arg(None, "PPO passes over each rollout; TRPO: critic regression passes (others: 1)")
    num_minibatches: int | None = arg(None, "PPO minibatches per pass; TRPO: critic minibatches per pass (others: 1)")
    clip: float | None = arg(None, "PPO ratio clip ε, on both sides (the LM backend's --clip-low ε --clip-high ε)")
    value_clip: float | None = arg(None, "PPO value-loss clip range (0 = off; the LM backend's off is None)")
    entropy_coef: float | None = arg(None, "entropy bonus coefficient")
    vf_coef: float | None = arg(None, "value-loss coefficient")
    max_grad_norm: float | None = arg(None, "gradient-norm clip (0 = off)")
    # policy
    hidden: list[int] | None = arg(None, "hidden layer widths of the actor and of the critic MLPs")
    obs_norm: bool | None = arg(None, "normalise observations with running mean/var (saved with the policy)")
    reward_norm: bool | None = arg(None, "scale rewards by the running std of the discounted return")
    log_std_init: float | None = arg(None, "initial log-std of the Gaussian head (continuous actions)")
    # TRPO (pg_lm/gym/trpo.py): the actor's natural-gradient step
    max_kl: float | None = arg(None, "TRPO: bound δ on the mean KL(π_old || π) of one update")
    cg_iters: int | None = arg(None, "TRPO: conjugate-gradient iterations for F x = g")
    cg_damping: float | None = arg(None, "TRPO: damping λ added to the Fisher matrix (F + λI)")
    line_search_steps: int | None = arg(None, "TRPO: backtracking steps before the update is rejected")
    backtrack_ratio: float | None = arg(None, "TRPO: factor by which the line search shrinks the step")
    # evaluation, logging
    target_return: float | None = arg(None, "stop early once a deterministic evaluation reaches this mean return")
    eval_episodes: int = arg(20, "deterministic evaluation episodes at the end (argmax / Gaussian mean)")
    progress: bool = arg(True, "show a progress bar")
    # checkpoints (pg_lm/gym/checkpoint.py)
    save_every: int = arg(0, "checkpoint every N updates and at the end (0 = no checkpoints)")
    save_total_limit: int | None = arg(2, "checkpoints kept (checkpoint-last and the newest checkpoint-<env steps>; None = all)")
    resume: bool = arg(False, "continue the same run from output_dir's newest intact checkpoint")
    threads: int = arg(1, "torch CPU threads (1 is fastest for these tiny MLPs)")

    def __post_init__(self):
        _check_env(self.env)
        if self.algo not in ALGO_NAMES:
            raise ValueError(f"unknown algo {self.algo!r}; choose one of {', '.join(ALGO_NAMES)}")
        if self.vector_mode not in VECTOR_MODES:
            raise ValueError(f"unknown vector_mode {self.vector_mode!r}; choose one of {', '.join(VECTOR_MODES)}")
        positive = ("total_steps", "num_envs", "n_steps", "lr", "ppo_epochs", "num_minibatches", "clip",
                    "eval_episodes", "threads")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ValueError(f"save_total_limit must be > 0 (or None for no limit), got {self.save_total_limit}")
        for name in ("value_clip", "entropy_coef", "vf_coef", "max_grad_norm", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        check_trpo(self)
        if self.hidden is not None and (not self.hidden or min(self.hidden) <= 0):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {self.hidden}")
        sizes = (self.num_envs, self.n_steps, self.num_minibatches)
        if None not in sizes and self.num_minibatches > self.num_envs * self.n_steps:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) exceeds the rollout size num_envs x n_steps "
                             f"({self.num_envs * self.n_steps})")


def _check_env(env_id: str) -> None:
    import gymnasium as gym

    try:
        gym.spec(env_id)
    except gym.error.Error as e:  # NameNotFound, VersionNotFound, DeprecatedEnv, ...
        raise ValueError(f"unknown environment {env_id!r} ({e})") from None


def defaults_for(env: str, algo: str) -> dict:
    """The default hyper-parameters of ``(env, algo)``, most specific table row winning. A row
    written with a field's old name (:data:`pg_lm.run.config.ALIASES`) sets the field."""
    out: dict = {}
    for key in (("*", "*"), (env, "*"), ("*", algo), (env, algo)):
        out.update(rename_aliases(GymConfig, DEFAULTS.get(key, {}), f"DEFAULTS[{key}]")[0])
    return out


def resolve(cfg: GymConfig) -> GymConfig:
    """A new config with every ``None`` hyper-parameter replaced by its default (validated again)."""
    table = defaults_for(cfg.env, cfg.algo)
    filled = {k: v for k, v in table.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **{k: list(v) if isinstance(v, list) else v for k, v in filled.items()})
