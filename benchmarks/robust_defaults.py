"""Defaults measured for robustness: candidate settings x tasks x seeds on the embedded model.

A library default should hold on a task nobody tuned it for, so each candidate setting (:data:`SETTINGS`:
the defaults the grid started from and one change each, the changes the DAPO and Dr. GRPO papers
propose among them) trains on every task of :data:`TASKS` (the built-in tasks, two of them -- ``rounding`` with
partial credit for a near miss, ``sorting`` whose answer is a list -- never used to pick a default)
with every seed, for the same ``--steps`` budget each, through ``pg-lm lm`` on the embedded
SmolLM2-135M-Instruct. Each run reports its held-out greedy reward before and after and whether the
learning-signal monitor found it collapsed (``summary.json``'s ``learning``).

The table (``table.md``): for each task and setting, the median and the worst held-out gain over the
seeds and the share of collapsed runs; then per setting, over every task and seed, the worst gain,
the 10% quantile, the mean over tasks of each task's worst gain, and the median. The rule that picks
the default (:func:`choose`), fixed before the runs: the best worst gain over every task and seed;
among settings within 0.01 of it, the best mean of per-task worst gains (a task every setting fails
cannot decide); then the fewest collapsed runs. Never the best mean on one task.

    python benchmarks/robust_defaults.py --output-dir runs/robust            # the whole grid
    python benchmarks/robust_defaults.py --tasks rounding --settings former-defaults,entropy --seeds 0,1
    python benchmarks/robust_defaults.py --output-dir runs/robust --render   # the table from runs.jsonl
    python benchmarks/robust_defaults.py --output-dir benchmarks/results/robust_defaults --render  # the published one

Runs already in ``runs.jsonl`` are skipped, so a stopped grid continues where it stopped. ``--jobs
2`` runs two at a time, each on one core; the budget is steps, so the figures do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("arithmetic", "countdown", "tagged", "counting", "rounding", "sorting")
# Each setting in full, so that the table reproduces whatever LMConfig's defaults are: the defaults
# the grid started from (RLOO over 8 samples, one on-policy update per rollout, LoRA r16, lr 2e-4,
# cosine, temperature 1) and one change each. CHOSEN, the rule's pick, is LMConfig's default.
CHOSEN = "dynamic-sampling"
FORMER = {"num-minibatches": "1", "clip-low": "none", "clip-high": "none", "dynamic-sampling": "false"}


def one_change(**change: str) -> list[str]:
    """The former defaults' flags with ``change`` (``clip_low="0.2"``) over them."""
    flags = {**FORMER, **{k.replace("_", "-"): v for k, v in change.items()}}
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


SETTINGS = {
    "former-defaults": one_change(),
    "clip-higher": one_change(num_minibatches="4", clip_low="0.2", clip_high="0.28"),  # (needs reuse to clip)
    "entropy": one_change(entropy_coef="0.001"),
    "lower-lr": one_change(lr="1e-4"),
    "temperature-1.2": one_change(temperature="1.2"),
    "dynamic-sampling": one_change(dynamic_sampling="true"),
    "dr-grpo": one_change(loss_type="dr_grpo", clip_low="0.2", clip_high="0.2"),  # the preset's clip: a no-op on policy
}


def command(task: str, setting: str, seed: int, steps: int, eval_size: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "pg_lm.cli", "lm", "--task", task, "--seed", str(seed), "--max-steps", str(steps),
            "--eval-size", str(eval_size), "--output-dir", str(out), "--save-model", "false", "--progress", "false",
            *SETTINGS[setting]]


def run_one(task: str, setting: str, seed: int, args, threads: int) -> dict:
    """One training run in its own process; its summary's figures."""
    out = Path(args.output_dir) / "runs" / f"{task}-{setting}-{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(command(task, setting, seed, args.steps, args.eval_size, out), env=env, cwd=ROOT,
                          capture_output=True, text=True)
    row = {"task": task, "setting": setting, "seed": seed, "steps_budget": args.steps, "eval_size": args.eval_size,
           "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr[-2000:]}
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row["step_s"] = statistics.median(r["perf/step_s"] for r in steps if "perf/step_s" in r)
    before, after = summary["eval/reward_before"], summary["eval/reward_after"]
    return {**row, "before": before, "after": after, "gain": after - before, "steps": summary["train/steps"],
            "learning": summary.get("learning", "learning"), "accuracy_after": summary.get("eval/accuracy_after")}


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (the lower of the two neighbours: a pessimistic low quantile)."""
    xs = sorted(xs)
    return xs[int(q * (len(xs) - 1))]


def per_task_worst(rows: list[dict], setting: str) -> float:
    """The mean over tasks of the worst gain over seeds of ``setting``'s runs."""
    g = [r for r in rows if r["setting"] == setting and "gain" in r]
    tasks = sorted({r["task"] for r in g})
    return statistics.mean(min(r["gain"] for r in g if r["task"] == t) for t in tasks)


def choose(rows: list[dict], tol: float = 0.01) -> str:
    """The setting the rule picks among those with every run of the grid's tasks and seeds done:
    the best worst gain; within ``tol`` of it, the best mean of per-task worst gains; then the
    fewest collapsed runs."""
    rows = [r for r in rows if "gain" in r]
    cells = {(r["task"], r["seed"]) for r in rows}
    full = [s for s in SETTINGS if {(r["task"], r["seed"]) for r in rows if r["setting"] == s} == cells]
    worst = {s: min(r["gain"] for r in rows if r["setting"] == s) for s in full}
    near = [s for s in full if worst[s] >= max(worst.values()) - tol]
    collapsed = lambda s: sum(r["learning"] == "collapsed" for r in rows if r["setting"] == s)
    return max(near, key=lambda s: (round(per_task_worst(rows, s), 6), -collapsed(s)))


def step_s(rows: list[dict]) -> str:
    """The median over ``rows`` of each run's median step time (``perf/step_s``), or "-" where none has one."""
    times = [r["step_s"] for r in rows if "step_s" in r]
    return f"{statistics.median(times):.2f}" if times else "-"


def render(rows: list[dict]) -> str:
    """The task x setting table and the per-setting summary, in markdown."""
    rows = [r for r in rows if "gain" in r]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = ["| task | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for t in tasks:
        cells = []
        for s in settings:
            g = [r for r in rows if r["task"] == t and r["setting"] == s]
            gains = [r["gain"] for r in g]
            cells.append("" if not g else f"{statistics.median(gains):+.2f} / {min(gains):+.2f} / "
                         f"{sum(r['learning'] == 'collapsed' for r in g)} of {len(g)}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "cells: median gain / worst gain / collapsed runs, over the seeds", "",
              "| setting | runs | worst gain | 10% quantile | mean of per-task worst | median gain | collapsed | step s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in settings:
        g = [r for r in rows if r["setting"] == s]
        gains = [r["gain"] for r in g]
        lines.append(f"| {s} | {len(g)} | {min(gains):+.3f} | {quantile(gains, 0.1):+.3f} | "
                     f"{per_task_worst(rows, s):+.3f} | {statistics.median(gains):+.3f} | "
                     f"{sum(r['learning'] == 'collapsed' for r in g)} | {step_s(g)} |")
    lines += ["", f"chosen by the rule (settings with every run done): {choose(rows)}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/robust")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=60, help="training steps of each run (a step budget: the same "
                   "updates whatever else the machine is doing; the learning-rate schedule decays over it)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out prompts evaluated before and after")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each on cores / jobs threads)")
    p.add_argument("--render", action="store_true", help="only remake table.md from runs.jsonl")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not args.render:
        unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
        if unknown:
            p.error(f"unknown --settings {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
        have = {(r["task"], r["setting"], r["seed"]) for r in done if "gain" in r}
        # seeds outermost: a grid stopped early has every setting on the same tasks and seeds
        todo = [(t, s, int(k)) for k in args.seeds.split(",") for t in args.tasks.split(",")
                for s in args.settings.split(",") if (t, s, int(k)) not in have]
        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            for row in pool.map(lambda job: run_one(*job, args, threads), todo):
                print(json.dumps(row), flush=True)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
    table = render(done)
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
