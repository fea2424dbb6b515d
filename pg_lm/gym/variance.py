"""``pg-lm variance --env ENV``: the gradient variance of each classic-control method at a fixed policy.

    pg-lm variance --env CartPole-v1 --batches 32                      # the initial policy
    pg-lm variance --env CartPole-v1 --policy runs/gym/policy.pt       # what a run trained

Each batch is a rollout of whole episodes (``Collector.collect(n_steps, complete=True)``, the one
REINFORCE trains on; the other methods' advantages bootstrap where a time limit cut an episode).
On each batch every method of :data:`pg_lm.gym.algos.ALGOS` gets its advantages from its own
advantage function with its own resolved γ, λ and whitening (pg_lm/gym/config.py's table for
``(env, method)``), and its loss from the trainer's :func:`~pg_lm.gym.algos.minibatch_loss` on the
whole batch as one minibatch; the gradient is taken over the actor's parameters (the critic's
value loss does not reach them). For TRPO it is the surrogate's gradient g, before the
conjugate gradient preconditions it. Rewards are raw (no ``--reward-norm`` scaling) and the
observation statistics of an ``--obs-norm`` policy are frozen: the policy does not move.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pg_lm.run.config import arg, rename_aliases

from .algos import ALGOS, flatten, minibatch_loss
from .config import ALGO_NAMES, GymConfig, resolve


@dataclass
class GymVarianceConfig:
    """Measure the gradient variance of each classic-control method at a fixed policy (the initial one,
    or a run's policy.pt): K batches of whole episodes, every method's gradient from the same samples."""

    env: str = arg("CartPole-v1", "Gymnasium env id (flat Box observations; Discrete or Box actions)")
    policy: str | None = arg(None, "a run's policy.pt (or its run folder); None = a freshly initialised policy")
    seed: int = arg(0, "random seed (initialisation, action sampling, environments)")
    batches: int = arg(16, "K: independent batches drawn at the fixed policy (>= 2)")
    estimators: list[str] = arg([], "methods to compare (empty = all)", ALGO_NAMES)
    reference: str = arg("reinforce-baseline", "method of the large-batch reference gradient", ALGO_NAMES)
    reference_batches: int = arg(16, "further batches averaged into the reference gradient (0 = no cosine)")
    num_envs: int = arg(4, "parallel environments")
    n_steps: int = arg(200, "steps per env per batch: episodes that start by then run to their end")
    gamma: float | None = arg(None, "discount factor for every method (None = each method's own default)")
    gae_lambda: float | None = arg(None, "GAE λ for every method (None = each method's own default)")
    hidden: list[int] | None = arg(None, "hidden widths of a fresh policy (None = the env's default)")
    output_dir: str = arg("runs/variance", "where variance.json and variance.png go")
    progress: bool = arg(True, "print each batch as it is drawn")

    def __post_init__(self):
        GymConfig(env=self.env)  # an unknown env is named here
        if self.batches < 2:
            raise ValueError(f"--batches must be >= 2 (a variance needs two estimates), got {self.batches}")
        if self.reference_batches < 0:
            raise ValueError(f"--reference-batches must be >= 0, got {self.reference_batches}")
        for name in ("num_envs", "n_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(self.estimators or ALGO_NAMES))


METHOD_FIELDS = ("algo", "gamma", "gae_lambda", "whiten_advantages", "entropy_coef")  # recorded per row


def method_configs(cfg: GymVarianceConfig, names: list[str], rows: dict[str, dict] | None = None) -> dict[str, GymConfig]:
    """Each row's resolved training config for ``cfg.env`` (γ, λ, whitening, coefficients): the method
    ``name`` at its defaults, or ``rows[name]``'s fields over its method's (old field names of
    :data:`pg_lm.run.config.ALIASES` read as their new ones)."""
    given = {k: getattr(cfg, k) for k in ("gamma", "gae_lambda", "hidden") if getattr(cfg, k) is not None}
    rows = {n: rename_aliases(GymConfig, row, f"row {n}")[0] for n, row in (rows or {}).items()}
    return {n: resolve(GymConfig(**{"algo": n, **rows.get(n, {}), "env": cfg.env, "seed": cfg.seed,
                                    "num_envs": cfg.num_envs, "n_steps": cfg.n_steps, "progress": False, **given}))
            for n in names}


def policy_gradients(policy, batch, names: list[str], cfgs: dict[str, GymConfig]) -> dict[str, Tensor]:
    """{row: the gradient (P,) of its method's loss on ``batch`` over the actor's parameters};
    row ``name``'s method and settings are ``cfgs[name]`` (``.algo`` and its hyper-parameters)."""
    from .trpo import actor_params

    params = actor_params(policy)
    out = {}
    for name in names:
        c = cfgs[name]
        algo = ALGOS[c.algo]
        adv, returns = algo.advantage(batch, c.gamma, c.gae_lambda)
        loss, _ = minibatch_loss(policy, flatten(batch, adv, returns), c, algo)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]).double()  # (P,)
    return out


def _load(cfg: GymVarianceConfig, names: list[str], cfgs: dict[str, GymConfig]):
    """(vector env, policy): a fresh policy with a critic, or the one ``--policy`` names."""
    from .policy import load_policy
    from .train import UsageError, _setup

    envs, policy = _setup(cfgs[cfg.reference], ALGOS["a2c"])  # a2c: built with a critic
    if cfg.policy is not None:
        path = Path(cfg.policy).expanduser()
        path = path / "policy.pt" if path.is_dir() else path
        if not path.is_file():
            envs.close()
            raise UsageError(f"--policy {cfg.policy}: no such file (a run's policy.pt, or its folder)")
        with torch.random.fork_rng(devices=[]):  # building it draws a fresh init: the samples stay the seed's
            policy = load_policy(path)
        need = [n for n in names if ALGOS[cfgs[n].algo].critic]
        if policy.critic is None and need:
            envs.close()
            raise UsageError(f"--policy {cfg.policy} has no critic (a plain REINFORCE run): leave out "
                             f"{', '.join(need)} (--estimators reinforce --reference reinforce)")
    if policy.obs_rms is not None:
        policy.obs_rms.frozen = True
    return envs, policy


def run_gym_variance(cfg: GymVarianceConfig, progress=None, rows: dict[str, dict] | None = None) -> tuple[dict, str]:
    """Measure as ``cfg`` says; returns (the JSON written, the markdown table).

    ``rows`` measures variants of the methods instead of ``cfg.estimators``: {row name: GymConfig
    fields over the method's defaults, ``algo`` included}, e.g. ``{"reinforce-raw": dict(algo="reinforce",
    whiten_advantages=False)}``; ``cfg.reference`` is then a row name."""
    from pg_lm.run.variance import measure, write_report

    from .rollout import Collector

    names = list(rows) if rows else cfg.names
    cfgs = method_configs(cfg, [*names, cfg.reference], rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        envs, policy = _load(cfg, names, cfgs)
        try:
            collector = Collector(envs, policy, cfg.seed)
            returns: list[float] = []

            def draw(i: int):
                batch = collector.collect(cfg.n_steps, complete=True)
                returns.extend(r for r, _ in collector.pop_episodes())
                return batch

            results = measure(draw, lambda b, n: policy_gradients(policy, b, n, cfgs), names, cfg.batches,
                              cfg.reference, cfg.reference_batches, progress)
        finally:
            envs.close()
    meta = {"backend": "gym", "env": cfg.env, "policy": cfg.policy, "batches": cfg.batches,
            "reference": cfg.reference, "reference_batches": cfg.reference_batches, "num_envs": cfg.num_envs,
            "n_steps": cfg.n_steps, "seed": cfg.seed, "episode_return_mean": sum(returns) / max(len(returns), 1),
            "episodes": len(returns),
            "methods": {n: {k: getattr(cfgs[n], k) for k in METHOD_FIELDS} for n in names}}
    title = f"gradient variance at a fixed policy: {cfg.env}, {cfg.policy or 'initial policy'}, K={cfg.batches}"
    return {**meta, "results": results}, write_report(results, meta, cfg.output_dir, title)


def main(argv: list[str] | None = None) -> int:
    from .train import UsageError, parse_args

    try:
        cfg = parse_args(argv, GymVarianceConfig, "pg-lm variance")
        _, table = run_gym_variance(cfg, progress=(lambda s: print(s, file=sys.stderr)) if cfg.progress else None)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    print(table)
    print(f"\n(variance.json and variance.png in {cfg.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
