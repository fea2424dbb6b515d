"""The policy-gradient method table, measured: each method's gradient variance and sample efficiency.

Every course's table says REINFORCE is "high variance, low sample efficiency" and PPO / TRPO
"low, medium". This script fills those columns with numbers, on both backends.

**Classic control** (``--part gym``; CartPole-v1 to 475, Pendulum-v1 to -300), one row per method
at pg_lm's per-env defaults (:data:`GYM_ROWS`; plain REINFORCE with its returns unwhitened, so that
the first row really has no baseline):

* sample efficiency: every row trains with every ``--seeds`` seed (interleaved by seed), evaluated
  every ``--eval-every`` env steps by ``benchmarks/cartpole.py``'s evaluator (20 deterministic
  episodes, evaluation time off the clock); reported: how many seeds reach the threshold within the
  method's own step budget, and the median env steps and training seconds to it over the seeds that do.
* gradient variance at matched points of training: one reference run (PPO, seed 0, with raw rewards
  so that its critic predicts the returns the variance is measured on) is saved when its evaluation
  first reaches :data:`MID` and when it reaches the threshold; at those policies and at the initial one,
  ``pg-lm variance --env`` draws ``--var-batches`` batches (4 envs x 200 steps of whole episodes) and
  computes every row's gradient from the same samples (``pg_lm.gym.variance.run_gym_variance``).

**Language model** (``--part lm``; the embedded SmolLM2-135M-Instruct on the arithmetic recipe),
one row per baseline of ``pg_lm.lm.variance.ESTIMATORS``:

* held-out accuracy in a fixed time budget: ``recipes/arithmetic.py`` with that row's flags and
  ``--max-seconds --lm-seconds`` (its cosine decay over that budget), one process after the other;
* gradient variance (``pg-lm variance``, ``--lm-batches`` batches of 4 prompts x 8 samples) at the
  initial model and at the checkpoint the ``loo`` run (the recipe's default) trained; ReMax's rollout
  decodes a greedy row per prompt, so it is measured in a run of its own (with ``none`` and ``loo`` on
  its samples as anchors).

**Episodes of many turns** (``--part turns``; ``benchmarks/pg_table_turns.py``): episode-level,
per-turn and GAE credit on guess-the-number, every seed of ``--turn-seeds`` for ``--turn-steps`` steps,
with the gradient variance of each credit mode at the initial model and a trained checkpoint.

Outputs in ``--output-dir``: ``gym.json`` / ``lm.json`` / ``turns.json`` (every run, curve and variance result),
``table.md`` (BENCHMARKS.md section 10) and its short form ``table_summary.md``, made from whichever JSONs are
there (``--part render`` remakes them). Run on an idle machine.

    python benchmarks/pg_table.py --part gym --output-dir runs/table
    python benchmarks/pg_table.py --part lm --output-dir runs/table
    python benchmarks/pg_table.py --part turns --output-dir runs/table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load1, machine_info, write_json  # noqa: E402
from pg_table_turns import TURN_ROWS, render_turns, turns_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# row -> (the textbook's method, its baseline, GymConfig fields over pg_lm's per-env defaults)
GYM_ROWS = {
    "reinforce": ("REINFORCE", "none (raw returns)", dict(algo="reinforce", whiten_advantages=False)),
    "reinforce-whitened": ("REINFORCE", "batch mean, std-scaled (whitened returns)", dict(algo="reinforce")),
    "reinforce-baseline": ("REINFORCE + baseline", "V(s)", dict(algo="reinforce-baseline")),
    "a2c": ("A2C", "V(s), GAE", dict(algo="a2c")),
    "ppo": ("PPO", "V(s), GAE, clipped ratio", dict(algo="ppo")),
    "trpo": ("TRPO", "V(s), GAE, KL constraint", dict(algo="trpo")),
}
TARGET = {"CartPole-v1": 475.0, "Pendulum-v1": -300.0}
MID = {"CartPole-v1": 200.0, "Pendulum-v1": -700.0}  # the "mid-training" matched point
POINTS = ("initial", "mid", "solved")

# row -> (the textbook's method, its baseline); the flags come from pg_lm.lm.variance.ESTIMATORS
LM_ROWS = {
    "none": ("REINFORCE", "none"),
    "batch_mean": ("REINFORCE + baseline", "batch mean"),
    "group_mean": ("REINFORCE + baseline", "group mean"),
    "group_mean_std": ("GRPO", "group mean, std-scaled"),
    "loo": ("RLOO", "leave-one-out"),
    "remax": ("ReMax", "greedy completion's reward"),
    "value": ("REINFORCE + baseline", "V(s), value head"),
    "gae": ("A2C", "V(s), GAE"),
}


# ------------------------------------------------------------------------------------------------ gym
def gym_part(args, out: Path) -> dict:
    import cartpole

    result = dict(part="gym", seeds=args.seeds, eval_every=args.eval_every, eval_episodes=20,
                  var_batches=args.var_batches, var_reference_batches=args.var_reference_batches,
                  load1_start=load1(), machine=machine_info(("torch", "gymnasium", "numpy")), envs={})
    tmp = tempfile.mkdtemp(prefix="pg_table_")
    for env in args.envs:
        ns = argparse.Namespace(env=env, target=TARGET[env], eval_every=args.eval_every, eval_episodes=20,
                                threads=1, max_steps=None, pg_lm_algo="ppo")
        runs: dict[str, list] = {row: [] for row in args.gym_rows}
        for seed in args.seeds:  # interleaved by seed, so drifts of the machine hit every row
            for row in args.gym_rows:
                r = cartpole.run_pg_lm(ns, seed, f"{tmp}/{env}-{row}-{seed}", overrides=GYM_ROWS[row][2])
                r["config"] = {k: r["config"][k] for k in ("algo", "total_steps", "num_envs", "n_steps", "lr",
                                                           "gamma", "gae_lambda", "whiten_advantages",
                                                           "reward_norm")}
                runs[row].append(r)
                done = f"{r['time_to_target_s']:.2f} s, {r['steps_to_target']} steps" if r["reached"] else "not reached"
                print(f"{env} seed {seed} {row}: {done}", flush=True)
        rows = {row: dict(cartpole.summarize(rs), budget_steps=rs[0]["config"]["total_steps"]) for row, rs in runs.items()}
        result["envs"][env] = dict(target=TARGET[env], rows=rows, variance=gym_variance(args, ns, env, out / "gym" / env))
    result["load1_end"] = load1()
    write_json(out / "gym.json", result)
    return result


def gym_variance(args, ns, env: str, out: Path) -> dict:
    """Every row's gradient variance at the initial policy and at the reference run's mid and solved points."""
    import cartpole

    from pg_lm.gym.policy import save_policy
    from pg_lm.gym.variance import GymVarianceConfig, run_gym_variance

    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, int] = {}

    def on_eval(policy, steps: int, mean: float) -> None:
        for point, level in (("mid", MID[env]), ("solved", TARGET[env])):
            if mean >= level and point not in saved:
                save_policy(policy, out / f"{point}.pt", {})
                saved[point] = steps

    ref = cartpole.run_pg_lm(ns, 0, str(out / "reference_run"), overrides=dict(algo="ppo", reward_norm=False),
                             on_eval=on_eval)
    rows = {row: spec[2] for row, spec in GYM_ROWS.items() if row in args.gym_rows}
    points = {}
    for point in POINTS:
        if point != "initial" and point not in saved:
            points[point] = None
            continue
        cfg = GymVarianceConfig(env=env, policy=None if point == "initial" else str(out / f"{point}.pt"), seed=1,
                                batches=args.var_batches, reference_batches=args.var_reference_batches,
                                output_dir=str(out / f"variance-{point}"), progress=False)
        measured, table = run_gym_variance(cfg, rows=rows)
        print(f"{env} gradient variance at the {point} policy:\n{table}", flush=True)
        points[point] = measured
    return dict(reference_run=dict(algo="ppo", seed=0, reward_norm=False, mid_level=MID[env],
                                   points={p: saved.get(p, 0 if p == "initial" else None) for p in POINTS},
                                   reached=ref["reached"]), points=points)


# ------------------------------------------------------------------------------------------------- lm
def lm_flags(row: str) -> list[str]:
    """The training flags of an LM row, from ``pg_lm.lm.variance.ESTIMATORS``."""
    from pg_lm.lm.variance import ESTIMATORS

    e = ESTIMATORS[row]
    return ["--estimator", e.estimator, "--baseline", e.baseline, "--scale-rewards", str(e.scale_rewards).lower()]


def pg_lm(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "pg_lm.cli", *argv], check=True, cwd=ROOT)


def lm_part(args, out: Path) -> dict:
    lm = out / "lm"
    result = dict(part="lm", seconds=args.lm_seconds, seed=args.seed, var_batches=args.lm_batches,
                  var_reference_batches=args.lm_reference_batches, load1_start=load1(),
                  machine=machine_info(("torch", "transformers", "peft", "accelerate")), rows={})
    for row in args.lm_rows:  # the accuracy each reaches in the same time budget, one run after the other
        run_dir = lm / f"run-{row}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "recipes/arithmetic.py", "--max-seconds", str(args.lm_seconds),
                        "--seed", str(args.seed), "--progress", "false", "--output-dir", str(run_dir),
                        *lm_flags(row)], check=True, cwd=ROOT)
        s = json.loads((run_dir / "summary.json").read_text())
        result["rows"][row] = dict(flags=lm_flags(row), accuracy_before=s["eval/reward_before"],
                                   accuracy_after=s["eval/reward_after"], steps=s["train/steps"],
                                   truncated_after=s.get("eval/truncated_frac_after"),
                                   process_s=time.perf_counter() - t0)
        print(f"lm {row}: held-out {s['eval/reward_before']:.2f} -> {s['eval/reward_after']:.2f} "
              f"in {s['train/steps']} steps", flush=True)
        write_json(out / "lm.json", result)
    trained = lm / "run-loo"
    result["variance"] = {}
    for point, adapter in (("initial", None), ("trained", trained)):
        if adapter is not None and not (adapter / "checkpoint-last").is_dir():
            continue
        measured = {}
        groups = {"main": [r for r in args.lm_rows if r != "remax"]}
        if "remax" in args.lm_rows:  # its own rollout; none and loo on the same samples as anchors
            groups["remax"] = ["remax", "none", "loo"]
        for key, group in groups.items():
            if not group:
                continue
            vdir = lm / f"variance-{point}-{key}"
            pg_lm("variance", "--task", "arithmetic", "--batches", str(args.lm_batches), "--reference-batches",
                  str(args.lm_reference_batches), "--seed", str(args.seed + 1), "--progress", "false",
                  "--output-dir", str(vdir), "--estimators", *group, *(["--adapter", str(adapter)] if adapter else []))
            measured[key] = json.loads((vdir / "variance.json").read_text())
        result["variance"][point] = measured
    result["load1_end"] = load1()
    write_json(out / "lm.json", result)
    return result


# --------------------------------------------------------------------------------------------- render
def _num(x, fmt: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def gym_points(points: dict, row: str, key: str, fmt: str) -> str:
    """``key`` of ``row``'s variance result at the initial / mid / solved points, "a / b / c"."""
    return " / ".join(_num(points[p]["results"][row][key], fmt) if points.get(p) else "—" for p in POINTS)


def lm_points(variance: dict, row: str, key: str, fmt: str) -> str:
    """``key`` of an LM row's variance result at the initial model and the trained checkpoint, "a / b"
    (ReMax's from its own rollout; the other rows' from the main one)."""
    cells = []
    for point in ("initial", "trained"):
        measured = variance.get(point, {}).get("remax" if row == "remax" else "main")
        cells.append(_num(measured["results"][row][key], fmt) if measured and row in measured["results"] else "—")
    return " / ".join(cells)


def _write(path: Path, lines: list[str]) -> str:
    text = "\n".join(lines)
    path.write_text(text)
    return text


def accuracy(row: dict) -> str:
    """An LM row's held-out accuracy before -> after, and its steps: "0.01 -> **0.79** (69)"."""
    return f"{row['accuracy_before']:.2f} -> **{row['accuracy_after']:.2f}** ({row['steps']})"


def median_or_none(values: list) -> float | None:
    """The median over seeds, a seed that never reached the threshold counting as infinitely slow."""
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def best_eval(row: dict) -> float | None:
    """The median over seeds of each run's best evaluation (how far the runs that fell short got)."""
    bests = [max(e[2] for e in run["evals"]) for run in row.get("runs", []) if run["evals"]]
    return statistics.median(bests) if bests else None


def render(out: Path) -> str:
    """``table.md`` from the JSONs in ``out``: one table per env, one for the language model."""
    parts = []
    gym = out / "gym.json"
    if gym.is_file():
        g = json.loads(gym.read_text())
        for env, e in g["envs"].items():
            pts = e["variance"]["points"]
            steps = e["variance"]["reference_run"]["points"]
            parts.append(f"**{env}** (threshold {e['target']:g}; {len(g['seeds'])} seeds; gradient variance at the "
                         f"initial policy / a PPO run's policy at {_num(steps.get('mid'), 'd')} and "
                         f"{_num(steps.get('solved'), 'd')} env steps, K = {g['var_batches']})\n")
            parts.append("| method | baseline | reached | env steps to threshold (median) | seconds (median) "
                         "| best evaluation (median) | gradient SNR (noise removed): initial / mid / solved "
                         "| total variance: initial / mid / solved |")
            parts.append("|---|---|---|---:|---:|---:|---|---|")
            for row, r in e["rows"].items():
                method, baseline, _ = GYM_ROWS[row]
                snr, var = gym_points(pts, row, "snr_debiased", ".2f"), gym_points(pts, row, "variance", ".3g")
                budget = f" of {r['budget_steps'] // 1000}k"
                parts.append(f"| {method} (`{row}`) | {baseline} | {r['reached']}{budget} "
                             f"| {_num(median_or_none(r['per_seed_steps']), ',.0f')} "
                             f"| {_num(median_or_none(r['per_seed_time_s']), '.1f')} | {_num(best_eval(r), '.0f')} "
                             f"| {snr} | {var} |")
            parts.append("")
    lm = out / "lm.json"
    if lm.is_file():
        m = json.loads(lm.read_text())
        var = m.get("variance", {})

        parts.append(f"**Arithmetic, SmolLM2-135M-Instruct** (LoRA r16, 4 prompts x 8 samples, 16 tokens; "
                     f"{m['seconds']:g} s of training per row, seed {m['seed']}; gradient variance at the initial "
                     f"model / at the `loo` run's checkpoint, K = {m['var_batches']})\n")
        parts.append("| method | baseline | held-out accuracy after the budget (steps) | evaluation answers cut at the "
                     "token limit | gradient SNR (noise removed): initial / trained | total variance: initial / trained |")
        parts.append("|---|---|---|---:|---|---|")
        for row, r in m["rows"].items():
            method, baseline = LM_ROWS[row]
            parts.append(f"| {method} (`{row}`) | {baseline} | {accuracy(r)} | {_num(r.get('truncated_after'), '.0%')} "
                         f"| {lm_points(var, row, 'snr_debiased', '.2f')} | {lm_points(var, row, 'variance', '.3g')} |")
        parts.append("")
    parts += render_turns(out)
    return _write(out / "table.md", parts)


def render_summary(out: Path) -> str:
    """``table_summary.md``: the tables in short -- both envs side by side, then the language model."""
    parts = []
    gym = out / "gym.json"
    if gym.is_file():
        envs = json.loads(gym.read_text())["envs"]
        head, rule = "| method | baseline |", "|---|---|"
        for env, e in envs.items():
            head += f" {env}: env steps to {e['target']:g} (seconds) | SNR: initial / mid / solved |"
            rule += "---:|---|"
        parts += [head, rule]
        for row, (method, baseline, _) in GYM_ROWS.items():
            if not all(row in e["rows"] for e in envs.values()):
                continue
            line = f"| {method} | {baseline} |"
            for e in envs.values():
                r, pts = e["rows"][row], e["variance"]["points"]
                steps, secs = median_or_none(r["per_seed_steps"]), median_or_none(r["per_seed_time_s"])
                reached = (f"{steps:,.0f} ({secs:.1f} s)" if steps is not None
                           else f"{r['reached']} seeds within {r['budget_steps'] // 1000}k")
                line += f" {reached} | {gym_points(pts, row, 'snr_debiased', '.2f')} |"
            parts.append(line)
        parts.append("")
    lm = out / "lm.json"
    if lm.is_file():
        m = json.loads(lm.read_text())
        var = m.get("variance", {})
        parts += [f"| method | baseline | held-out accuracy after {m['seconds']:g} s (steps) | SNR: initial / trained "
                  "| total variance: initial / trained |", "|---|---|---|---|---|"]
        for row, r in m["rows"].items():
            parts.append(f"| {LM_ROWS[row][0]} | {LM_ROWS[row][1]} | {accuracy(r)} "
                         f"| {lm_points(var, row, 'snr_debiased', '.2f')} | {lm_points(var, row, 'variance', '.2g')} |")
        parts.append("")
    return _write(out / "table_summary.md", parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("gym", "lm", "turns", "all", "render"), default="all")
    p.add_argument("--output-dir", default="runs/table")
    p.add_argument("--envs", nargs="+", choices=tuple(TARGET), default=list(TARGET))
    p.add_argument("--gym-rows", nargs="+", choices=tuple(GYM_ROWS), default=list(GYM_ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--eval-every", type=int, default=1000, help="env steps between evaluations")
    p.add_argument("--var-batches", type=int, default=64, help="gym: K batches per variance measurement")
    p.add_argument("--var-reference-batches", type=int, default=64)
    p.add_argument("--lm-rows", nargs="+", choices=tuple(LM_ROWS), default=list(LM_ROWS))
    p.add_argument("--lm-seconds", type=float, default=300.0, help="LM: training seconds per row")
    p.add_argument("--lm-batches", type=int, default=32, help="LM: K batches per variance measurement")
    p.add_argument("--lm-reference-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="LM: the seed of every run")
    p.add_argument("--turn-rows", nargs="+", choices=tuple(TURN_ROWS), default=list(TURN_ROWS))
    p.add_argument("--turn-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--turn-steps", type=int, default=40, help="turns: training steps per run")
    p.add_argument("--turn-batches", type=int, default=16, help="turns: K batches per variance measurement")
    args = p.parse_args(argv)
    if len(args.seeds) < 1 or args.var_batches < 2 or args.lm_batches < 2:
        p.error("--seeds needs one seed and --var-batches / --lm-batches at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.part in ("gym", "all"):
        gym_part(args, out)
    if args.part in ("lm", "all"):
        lm_part(args, out)
    if args.part in ("turns", "all"):
        turns_part(args, out)
    print(render(out))
    render_summary(out)
    print(f"(in short: {out / 'table_summary.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
