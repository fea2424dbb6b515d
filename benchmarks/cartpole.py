"""pg_lm vs Stable-Baselines3 / sb3-contrib: wall-clock time to an evaluation mean of 475 on
CartPole-v1 (or of ``--target``, default -300, on ``--env Pendulum-v1``).

Each library at its own tuned settings for the env:

* pg_lm: ``pg_lm.gym.train`` with ``--pg-lm-algo`` (ppo, a2c or trpo; default ppo) at its
  per-env defaults (``pg_lm/gym/config.py`` DEFAULTS, resolved and recorded in the JSON);
* SB3 (``--sb3-algos``): rl-baselines3-zoo's tuned ``hyperparams/ppo.yml``, ``a2c.yml`` and
  ``trpo.yml`` rows (:data:`SB3_ZOO`; TRPO from sb3-contrib), DummyVecEnv as rl-zoo builds it.
  CartPole-v1 -- PPO: 8 envs, n_steps 32, batch 256, gae_lambda 0.8, gamma 0.98, 20 epochs,
  ent_coef 0, lr lin_0.001, clip lin_0.2, 1e5 steps; A2C: 8 envs, ent_coef 0, SB3 defaults
  otherwise, 5e5 steps; TRPO: 2 envs, n_steps 512, batch 512, cg_damping 1e-3, gae_lambda
  0.98, gamma 0.99, lr 1e-3, 20 critic updates, 1e5 steps. Pendulum-v1 -- TRPO: 2 envs,
  n_steps 1024, gamma 0.9, 15 critic updates, gSDE (sample every 4 steps), 1e5 steps (pg_lm
  has no gSDE: its Pendulum TRPO row uses a plain state-independent log-std).

Every ``--eval-every`` environment steps the current policy plays ``--eval-episodes``
deterministic episodes (argmax action; one fresh env per episode, the same seeds for
every library) with one evaluation function for both libraries; a run stops at the first
evaluation whose mean return is >= ``--target``: SB3 through a ``BaseCallback`` that
returns False, pg_lm through ``train(cfg, callback)``'s per-update callback returning True.
The clock is each library's wall time from its first training step **minus evaluation
time** (for both libraries): SB3's from ``_on_training_start``; pg_lm's own training clock,
read from its metrics row (``env_steps / perf/steps_per_s``). Runs that do not get
there within their own step budget (or ``--max-steps``) count as not reached.

Reported per library: median over ``--seeds`` of the time (and env steps) to the target.

    python benchmarks/cartpole.py --seeds 0 1 2 --output runs/bench/cartpole.json
    python benchmarks/cartpole.py --pg-lm-algo trpo --output runs/bench/cartpole_trpo.json
    python benchmarks/cartpole.py --env Pendulum-v1 --pg-lm-algo trpo --output runs/bench/pendulum_trpo.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load1, machine_info, write_json  # noqa: E402

TARGETS = {"CartPole-v1": 475.0, "Pendulum-v1": -300.0}  # the default --target per env

SB3_ZOO = {  # rl-baselines3-zoo hyperparams/{ppo,a2c,trpo}.yml (policy: MlpPolicy)
    "CartPole-v1": {
        "ppo": dict(n_envs=8, n_timesteps=100_000, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
                    n_epochs=20, ent_coef=0.0, learning_rate="lin_0.001", clip_range="lin_0.2"),
        "a2c": dict(n_envs=8, n_timesteps=500_000, ent_coef=0.0),
        "trpo": dict(n_envs=2, n_timesteps=100_000, n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98,
                     gamma=0.99, learning_rate=1e-3, n_critic_updates=20),
    },
    "Pendulum-v1": {
        "trpo": dict(n_envs=2, n_timesteps=100_000, n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True,
                     sde_sample_freq=4),
    },
}


def zoo_kwargs(row: dict) -> dict:
    """An rl-zoo row -> SB3 constructor kwargs; ``lin_<x>`` is rl-zoo's linear schedule
    ``progress_remaining * x`` (progress_remaining goes 1 -> 0 over n_timesteps)."""
    def value(v):
        if isinstance(v, str) and v.startswith("lin_"):
            x = float(v[4:])
            return lambda progress_remaining: progress_remaining * x
        return v

    return {k: value(v) for k, v in row.items() if k not in ("n_envs", "n_timesteps")}


def deterministic_return(env: str, act, episodes: int, seed: int) -> float:
    """Mean return of ``episodes`` deterministic episodes, one env each, all started together.
    ``act``: (N, D) observations -> (N,) or (N, A) actions, within the action bounds."""
    import gymnasium as gym

    envs = gym.make_vec(env, num_envs=episodes, vectorization_mode="sync")
    try:
        obs, _ = envs.reset(seed=seed)
        total, running = np.zeros(episodes), np.ones(episodes, bool)
        while running.any():  # both envs end by a time limit (CartPole-v1 500 steps, Pendulum-v1 200)
            obs, reward, term, trunc, _ = envs.step(act(obs))
            total += reward * running
            running &= ~(term | trunc)
        return float(total.mean())
    finally:
        envs.close()


class Evaluator:
    """Evaluates every ``every`` env steps; keeps evaluation time off the clock and remembers
    when the target was first met."""

    def __init__(self, args, seed: int):
        self.env, self.every, self.episodes, self.target = args.env, args.eval_every, args.eval_episodes, args.target
        self.seed, self.next_at, self.excluded, self.curve, self.hit = seed + 10_000, args.eval_every, 0.0, [], None

    def due(self, steps: int) -> bool:
        return steps >= self.next_at

    def __call__(self, act, steps: int, elapsed: float) -> bool:
        """Evaluate now; True when the target is reached. ``elapsed``: the library's wall time
        since its first training step, earlier evaluations included."""
        while self.next_at <= steps:
            self.next_at += self.every
        train_s = elapsed - self.excluded
        t0 = time.perf_counter()
        mean = deterministic_return(self.env, act, self.episodes, self.seed)
        self.excluded += time.perf_counter() - t0
        self.curve.append((steps, round(train_s, 3), mean))
        if mean >= self.target and self.hit is None:
            self.hit = dict(steps=steps, seconds=train_s)
        return self.hit is not None

    def result(self, steps: int, elapsed: float) -> dict:
        return dict(reached=self.hit is not None, time_to_target_s=self.hit and self.hit["seconds"],
                    steps_to_target=self.hit and self.hit["steps"], env_steps=steps,
                    train_s=elapsed - self.excluded, eval_s_excluded=self.excluded, evals=self.curve)


def run_pg_lm(args, seed: int, output_dir: str, overrides: dict | None = None, on_eval=None) -> dict:
    """``pg_lm.gym.train`` with a per-update callback that evaluates and stops at the target.

    ``args.pg_lm_algo`` at its per-env defaults, ``overrides`` (GymConfig fields, ``algo`` included)
    over them; ``on_eval(policy, steps, mean_return)`` runs after each evaluation."""
    from pg_lm.gym import GymConfig, resolve, train

    cfg = resolve(GymConfig(**{"algo": args.pg_lm_algo, **(overrides or {}), "env": args.env, "seed": seed,
                               "progress": False, "threads": args.threads, "output_dir": output_dir}))
    cap = min(cfg.total_steps, args.max_steps or cfg.total_steps)
    ev = Evaluator(args, seed)

    def callback(policy, row: dict) -> bool:
        steps = row["env_steps"]
        if ev.due(steps):
            elapsed = steps / row["perf/steps_per_s"]  # pg_lm's clock: seconds since its first rollout

            @torch.no_grad()
            def act(obs):
                return policy.head.to_env(policy.act(policy.normalize(obs), deterministic=True)[0])

            hit = ev(act, steps, elapsed)
            if on_eval is not None:
                on_eval(policy, steps, ev.curve[-1][2])
            if hit:
                return True
        return steps >= cap

    summary = train(cfg, callback)  # its final evaluation and output files come after its clock stops
    return dict(ev.result(summary["env_steps"], summary["train_s"]), algo=cfg.algo, config=dict(vars(cfg)))


def run_sb3(args, algo: str, seed: int) -> dict:
    """SB3 (sb3-contrib for TRPO) with rl-zoo's tuned row for the env; a callback evaluates and
    stops at the target."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    zoo = SB3_ZOO[args.env][algo]
    budget = min(zoo["n_timesteps"], args.max_steps or zoo["n_timesteps"])
    torch.set_num_threads(args.threads)
    env = make_vec_env(args.env, n_envs=zoo["n_envs"], seed=seed)
    if algo == "trpo":
        from sb3_contrib import TRPO as cls
    else:
        cls = {"ppo": PPO, "a2c": A2C}[algo]
    model = cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **zoo_kwargs(zoo))
    ev, clock = Evaluator(args, seed), {}
    act = lambda obs: model.predict(obs, deterministic=True)[0]

    class EvalStop(BaseCallback):
        def _on_training_start(self) -> None:
            clock["start"] = time.perf_counter()

        def _on_step(self) -> bool:
            if self.num_timesteps >= budget:
                return False
            elapsed = time.perf_counter() - clock["start"]
            return not (ev.due(self.num_timesteps) and ev(act, self.num_timesteps, elapsed))

    # the schedules span rl-zoo's n_timesteps, whatever --max-steps cuts off
    model.learn(total_timesteps=zoo["n_timesteps"], callback=EvalStop())
    elapsed = time.perf_counter() - clock["start"]
    env.close()
    return dict(ev.result(model.num_timesteps, elapsed), algo=algo, config=dict(zoo, policy="MlpPolicy"))


def median_time(runs: list[dict]) -> float | None:
    """Median time over seeds; a seed that never reached the target counts as infinitely slow."""
    times = [r["time_to_target_s"] if r["reached"] else float("inf") for r in runs]
    m = statistics.median(times)
    return None if m == float("inf") else m


def summarize(runs: list[dict]) -> dict:
    reached = [r for r in runs if r["reached"]]
    return dict(median_time_to_target_s=median_time(runs),
                median_steps_to_target=statistics.median([r["steps_to_target"] for r in reached]) if reached else None,
                reached=f"{len(reached)}/{len(runs)}",
                per_seed_time_s=[r["time_to_target_s"] for r in runs],
                per_seed_steps=[r["steps_to_target"] for r in runs], runs=runs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", choices=tuple(SB3_ZOO), default="CartPole-v1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None, help="env-step cap per run (default: each one's own budget)")
    p.add_argument("--target", type=float, default=None, help="evaluation mean return to reach "
                   f"(default: {', '.join(f'{k} {v:g}' for k, v in TARGETS.items())})")
    p.add_argument("--eval-every", type=int, default=1000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=20, help="deterministic episodes per evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both libraries")
    p.add_argument("--pg-lm-algo", choices=("ppo", "a2c", "trpo"), default="ppo")
    p.add_argument("--sb3-algos", nargs="+", choices=("ppo", "a2c", "trpo"), default=None,
                   help="SB3 algorithms with an rl-zoo row for --env (default: trpo with --pg-lm-algo trpo, "
                   "else the env's other rows)")
    p.add_argument("--output", default="runs/bench/cartpole.json")
    args = p.parse_args(argv)
    if args.eval_episodes < 20:
        p.error("--eval-episodes must be >= 20")
    rows = SB3_ZOO[args.env]
    args.sb3_algos = args.sb3_algos or [a for a in rows if (a == "trpo") == (args.pg_lm_algo == "trpo")]
    if not args.sb3_algos:
        p.error(f"no SB3 algorithm to compare with by default on {args.env}: "
                f"pass --sb3-algos (have: {', '.join(rows)})")
    missing = [a for a in args.sb3_algos if a not in rows]
    if missing:
        p.error(f"no rl-zoo row for {', '.join(missing)} on {args.env} (have: {', '.join(rows)})")
    args.target = TARGETS[args.env] if args.target is None else args.target
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_cartpole_")  # pg_lm's run outputs
    result = dict(benchmark="cartpole" if args.env == "CartPole-v1" else args.env, env=args.env,
                  pg_lm_algo=args.pg_lm_algo, load1_start=load1(),
                  machine=machine_info(("torch", "gymnasium", "stable_baselines3", "sb3_contrib", "numpy")),
                  target=args.target, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  threads=args.threads, seeds=args.seeds, clock="wall time from the first training step minus "
                  "evaluation time (both libraries)")
    runs = {"pg_lm": [], **{f"sb3_{a}": [] for a in args.sb3_algos}}
    for seed in args.seeds:  # interleaved by seed, so drifts of the machine hit every library
        for name in runs:
            r = run_pg_lm(args, seed, f"{tmp}/seed{seed}") if name == "pg_lm" else run_sb3(args, name[4:], seed)
            done = f"{r['time_to_target_s']:.2f} s, {r['steps_to_target']} steps" if r["reached"] else "not reached"
            print(f"seed {seed} {name}: {done}", flush=True)
            runs[name].append(r)
    result["load1_end"] = load1()
    for name, rs in runs.items():
        result[name] = summarize(rs)
    sb3 = {n: result[n]["median_time_to_target_s"] for n in runs if n.startswith("sb3_")}
    best = min(sb3, key=lambda n: sb3[n] if sb3[n] is not None else float("inf"))
    result.update(pg_lm_time_to_target_s=result["pg_lm"]["median_time_to_target_s"],
                  sb3_time_to_target_s=sb3[best], sb3_fastest_algo=best[4:])
    write_json(args.output, result)
    print(f"{args.env} median time to {args.target:g}: pg_lm {args.pg_lm_algo} {result['pg_lm_time_to_target_s']} s; "
          f"SB3 ({best[4:]}) {result['sb3_time_to_target_s']} s; load1 {result['load1_start']:.2f} -> "
          f"{result['load1_end']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
