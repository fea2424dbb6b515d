"""``pg-lm gym``: one training loop for REINFORCE, REINFORCE with baseline, A2C, PPO and TRPO.

    collect a rollout -> algo.advantage (core: discounted_returns / gae) -> update (core
    losses) -> log -> [early stop on --target-return] -> [checkpoint every --save-every
    updates] ... -> evaluate -> write outputs (and a last checkpoint)

The algorithms differ only in the :class:`~pg_lm.gym.algos.Algo` row they bring.
``--resume`` continues from the newest checkpoint: see :mod:`pg_lm.gym.checkpoint`.
"""

from __future__ import annotations

import contextlib
import io
import random
import sys
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pg_lm.run import RunWriter, parse_config, to_dict, trim_logs
from pg_lm.run.checkpoints import clear
from pg_lm.run.signals import Interrupted, stop_on_signals

from .algos import ALGOS, Algo, update
from .checkpoint import RunState, check_saveable, find_checkpoint, load_checkpoint, save_checkpoint
from .config import GymConfig, resolve
from .envs import evaluate, make_envs
from .policy import ActorCritic, policy_spec, save_policy
from .rollout import Collector, RewardScaler

RECENT = 20  # episodes in the "recent training return" (progress bar, early-stop trigger)

# called after every update with the policy and that update's metrics row; True stops training
Callback = Callable[[ActorCritic, dict], "bool | None"]


class UsageError(ValueError):
    """Bad user input (flags, env, spaces): the CLI prints it as one line and exits 2."""


def train(cfg: GymConfig, callback: Callback | None = None) -> dict:
    """Train ``cfg.algo`` on ``cfg.env``, write the run's outputs, return the summary.

    ``callback(policy, metrics_row)`` runs after every update (custom evaluations,
    benchmarks' own stopping rules); returning True ends training early, and the final
    evaluation and outputs still happen.

    Seeding (and a resume's restoring of the saved generators) happens inside a fork of
    torch's, Python's and NumPy's global generators, and the thread count is restored, so
    calling this does not change the caller's random state.
    """
    try:
        cfg = resolve(cfg)  # validates the filled-in combination (e.g. minibatches vs rollout size) again
    except ValueError as e:
        raise UsageError(str(e)) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    saved = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return _train(cfg, ALGOS[cfg.algo], callback)
    finally:
        torch.set_num_threads(threads)
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _setup(cfg: GymConfig, algo: Algo) -> tuple:
    """The vector env and the policy; an env or space we cannot handle is a UsageError."""
    try:
        envs = make_envs(cfg.env, cfg.num_envs, cfg.vector_mode)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        spec = policy_spec(envs.single_observation_space, envs.single_action_space, cfg.hidden,
                           algo.critic, cfg.obs_norm, cfg.log_std_init)
    except ValueError as e:
        envs.close()
        raise UsageError(f"{cfg.env}: {e}") from None
    return envs, ActorCritic(spec)


def _train(cfg: GymConfig, algo: Algo, callback: Callback | None) -> dict:
    t0 = time.perf_counter()
    envs, policy = _setup(cfg, algo)
    try:
        found = None
        try:
            if cfg.save_every:  # before any work: an env whose state cannot be saved is refused now
                check_saveable(envs, cfg.env)
            if cfg.resume:
                found = find_checkpoint(cfg)  # (folder, trainer state)
                trim_logs(cfg.output_dir, found[1]["collector"]["steps"])  # rows after it are redone
        except ValueError as e:
            raise UsageError(str(e)) from None
        if found is None and (n := clear(cfg.output_dir)):  # as the LM backend: a later --resume must find ours
            print(f"starting over in {cfg.output_dir}: removed {n} checkpoint(s) of an earlier run "
                  "(--resume continues one)")
        scaler = RewardScaler(cfg.num_envs, cfg.gamma) if cfg.reward_norm else None
        collector = Collector(envs, policy, cfg.seed, scaler)
        writer = RunWriter(cfg.output_dir, resume=found is not None)
        writer.write_json("config.json", to_dict(cfg))
        # created before the clock starts: the first optimizer imports torch._dynamo (~1 s, once per process)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
        run = RunState(cfg, policy, opt, collector, writer, t0=t0, start=time.perf_counter())
        if found is not None:  # last: the policy's initialisation drew from the generators it restores
            load_checkpoint(run, *found, now=time.perf_counter())
            envs = collector.envs  # the saved envs (the fresh ones are closed)
        with stop_on_signals(run):
            hit = _loop(run, algo, callback)
        if cfg.save_every and (run.saved is None or run.saved[0] != collector.steps):
            save_checkpoint(run, time.perf_counter())  # the end: --resume with a larger --total-steps goes on
        return _finish(run, hit)
    finally:
        envs.close()


def _recent(collector: Collector) -> float:
    eps = list(collector.episodes)[-RECENT:]
    return float(np.mean([r for r, _ in eps])) if eps else float("nan")


def _log_row(collector: Collector, stats: dict, lr: float, elapsed: float) -> dict:
    row: dict = {"env_steps": collector.steps}
    new = collector.pop_episodes()
    if new:
        row["charts/episodic_return"] = float(np.mean([r for r, _ in new]))
        row["charts/episodic_length"] = float(np.mean([n for _, n in new]))
    row.update(stats)
    row["charts/lr"] = lr
    row["perf/steps_per_s"] = collector.steps / max(elapsed, 1e-9)
    return row


def _loop(run: RunState, algo: Algo, callback: Callback | None) -> dict | None:
    """Train until ``total_steps`` (or the target). Returns the early-stop record, if any."""
    cfg, policy, opt, collector, writer, start = run.cfg, run.policy, run.opt, run.collector, run.writer, run.start
    bar = tqdm(total=cfg.total_steps, initial=collector.steps, unit="step", disable=not cfg.progress,
               desc=f"{cfg.algo} {cfg.env}")
    hit = None
    while collector.steps < cfg.total_steps:
        if run.signal:
            bar.close()
            _interrupted(run)
        lr = cfg.lr * (1.0 - collector.steps / cfg.total_steps) if cfg.anneal_lr else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        before = collector.steps
        # the last fixed-length rollout is shortened so that a run never exceeds total_steps by a rollout
        left = -(-(cfg.total_steps - before) // cfg.num_envs)  # ceil: steps per env still in the budget
        n = cfg.n_steps if algo.complete_episodes else min(cfg.n_steps, left)
        batch = collector.collect(n, complete=algo.complete_episodes)
        adv, returns = algo.advantage(batch, cfg.gamma, cfg.gae_lambda)  # (B, T) each
        stats = update(policy, opt, batch, adv, returns, cfg, algo)
        run.updates += 1
        row = _log_row(collector, stats, lr, time.perf_counter() - start)
        writer.log(row, step=collector.steps)
        bar.update(collector.steps - before)
        bar.set_postfix(ret=f"{_recent(collector):.1f}", sps=f"{row['perf/steps_per_s']:.0f}", refresh=False)
        if callback is not None and callback(policy, row):
            break
        if cfg.target_return is not None and _recent(collector) >= cfg.target_return:
            # the stochastic training return only triggers the check; the deterministic eval decides
            returns_eval = evaluate(policy, cfg.env, cfg.eval_episodes, cfg.seed + 10_000, cfg.vector_mode)
            if returns_eval.mean() >= cfg.target_return:
                hit = dict(steps=collector.steps, seconds=time.perf_counter() - start, returns=returns_eval)
                break
        if cfg.save_every and run.updates % cfg.save_every == 0:
            save_checkpoint(run, time.perf_counter())
    bar.close()
    return hit


def _interrupted(run: RunState) -> None:
    """A signal stopped the run: save (with --save-every, unless this step is saved already), raise."""
    path = None
    if run.cfg.save_every:
        done = run.saved is not None and run.saved[0] == run.collector.steps
        path = run.saved[1] if done else save_checkpoint(run, time.perf_counter())
    raise Interrupted(run.signal, run.collector.steps, path)


def _finish(run: RunState, hit: dict | None) -> dict:
    """Final evaluation, summary.json, policy.pt, returns.png. ``train_s`` and
    ``time_to_target_s`` count from the first rollout (in-loop evaluations included);
    ``wall_s`` from env creation to the final evaluation (imports and file writing excluded).
    A resumed run's clocks include the time the earlier run spent up to its checkpoint."""
    cfg, policy, collector, writer, t0 = run.cfg, run.policy, run.collector, run.writer, run.t0
    train_s = time.perf_counter() - run.start
    # an early stop already evaluated this very policy: reuse it rather than run it again
    returns = hit["returns"] if hit else evaluate(policy, cfg.env, cfg.eval_episodes, cfg.seed + 10_000,
                                                  cfg.vector_mode)
    summary = {
        "env": cfg.env, "algo": cfg.algo, "seed": cfg.seed, "output_dir": cfg.output_dir,
        "eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std()),
        "eval/episodes": len(returns), "train/return_mean": _recent(collector),
        "env_steps": collector.steps, "train_s": train_s, "wall_s": time.perf_counter() - t0,
        "target_return": cfg.target_return,
        "steps_to_target": hit["steps"] if hit else None,
        "time_to_target_s": hit["seconds"] if hit else None,
    }
    writer.write_json("summary.json", summary)
    save_policy(policy, writer.dir / "policy.pt", to_dict(cfg))
    writer.plot("charts/episodic_return", "returns.png", x_key="env_steps", title=f"{cfg.algo} on {cfg.env}",
                extra={"eval (deterministic)": [(collector.steps, summary["eval/return_mean"])]})
    return summary


def parse_args(argv: list[str] | None, cls: type = GymConfig, prog: str = "pg-lm gym"):
    """Flags -> ``cls`` (a :class:`GymConfig`). A bad flag or value raises :class:`UsageError` with a
    one-line message (``parse_config`` reports through argparse, which prints the whole usage);
    anything else parsing prints (a deprecated flag's notice) reaches stderr."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg = parse_config(cls, argv, prog=prog)
        sys.stderr.write(err.getvalue())  # what parsing said besides errors: an old flag name's notice
        return cfg
    except SystemExit as e:
        if not e.code:  # --help
            raise
        lines = err.getvalue().strip().splitlines()
        msg = e.code if isinstance(e.code, str) else (lines[-1] if lines else f"exit status {e.code}")
        raise UsageError(msg.split("error: ", 1)[-1]) from None


def main(argv: list[str] | None = None) -> int:
    """``pg-lm gym [flags]``: 0 on success, 2 with a one-line ``error: ...`` on bad input,
    128 + the signal after SIGINT / SIGTERM."""
    try:
        summary = train(parse_args(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT / SIGTERM: saved (with --save-every), exit 130 / 143
        print(e, file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    print(describe(summary))
    return 0


def describe(summary: dict) -> str:
    """One line: the final deterministic evaluation, steps, time and where the outputs are."""
    target = (f"; reached {summary['target_return']} after {summary['steps_to_target']} steps "
              f"({summary['time_to_target_s']:.1f} s)" if summary["steps_to_target"] else "")
    return (f"{summary['algo']} {summary['env']}: eval return {summary['eval/return_mean']:.1f} "
            f"± {summary['eval/return_std']:.1f} over {summary['eval/episodes']} deterministic episodes after "
            f"{summary['env_steps']} steps in {summary['wall_s']:.1f} s{target} -> {summary['output_dir']}")
