"""The method table's multi-turn part: credit over turns on a shipped environment, measured.

On single-completion tasks every baseline reaches the same accuracy and gradient SNR, so the
course's tools (discounting, a learned V(s), GAE) have nothing to act on. An episode of many turns
is where they should: ``recipes/guess_number.py`` (guess a number in 1..15 with higher / lower
feedback, at most 4 turns, the embedded SmolLM2-135M-Instruct) trains once per credit mode of
:data:`TURN_ROWS` and seed, for the same ``--turn-steps`` budget each (a step budget: the figures do
not depend on what else the machine does), and reports held-out success and mean return (100
held-out games, one greedy episode each) before and after. ``pg-lm variance --env guess`` then
measures every credit mode's gradient on the same episodes at the initial model and at the
checkpoint of the ``turn`` row's first seed.

    python benchmarks/pg_table.py --part turns --output-dir runs/table      # turns.json, then the tables
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import load1, machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]
# the discount between turns of the per-turn rows. With γ = 1 and one reward at the winning turn, every
# turn's return-to-go is the episode's return and per-turn credit equals the episode's (tested in
# tests/test_core_turns.py): γ < 1 is what makes a turn nearer the win worth more than one further away
TURN_GAMMA = "0.8"
# row -> (the textbook's method, its credit, the recipe's flags); each over RLOO's leave-one-out baseline
TURN_ROWS = {
    "episode": ("RLOO on the episode's return", "the episode's return on every action", ["--credit", "episode"]),
    "turn": ("REINFORCE, per-turn return-to-go", f"its turn's return-to-go (γ_turn {TURN_GAMMA})",
             ["--credit", "turn", "--turn-gamma", TURN_GAMMA]),
    "turn_index": ("... baseline per turn index", "... minus the mean at the same turn index",
                   ["--credit", "turn", "--turn-gamma", TURN_GAMMA, "--turn-baseline", "turn_index"]),
    "turn_gae": ("A2C over turns", f"GAE over action tokens, value head (γ_turn {TURN_GAMMA}, λ 0.95)",
                 ["--credit", "gae", "--turn-gamma", TURN_GAMMA]),
}
# the recipe's episodes, the rows' discount between turns
VARIANCE_FLAGS = ["--env", "guess", "--max-turns", "4", "--max-new-tokens", "8", "--turn-gamma", TURN_GAMMA]


def turns_part(args, out: Path) -> dict:
    """Train every row with every seed (interleaved by seed), then the variance at two points."""
    result = dict(part="turns", steps=args.turn_steps, seeds=args.turn_seeds, var_batches=args.turn_batches,
                  load1_start=load1(), machine=machine_info(("torch", "transformers", "peft", "accelerate")),
                  rows={row: [] for row in args.turn_rows})
    for seed in args.turn_seeds:
        for row in args.turn_rows:
            run_dir = out / "turns" / f"run-{row}-{seed}"
            if not (run_dir / "summary.json").is_file():  # a run already made is read, not made again
                subprocess.run([sys.executable, "recipes/guess_number.py", "--max-steps", str(args.turn_steps),
                                "--max-seconds", "None", "--seed", str(seed), "--progress", "false",
                                "--output-dir", str(run_dir), *TURN_ROWS[row][2]], check=True, cwd=ROOT)
            s = json.loads((run_dir / "summary.json").read_text())
            before = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                          if '"eval/accuracy"' in line)  # the evaluation at step 0
            result["rows"][row].append(dict(seed=seed, success_before=before["eval/accuracy"],
                                            success_after=s["eval/accuracy_after"], return_before=s["eval/reward_before"],
                                            return_after=s["eval/reward_after"], turns_after=s.get("eval/turns_after"),
                                            steps=s["train/steps"], wall_s=s["wall_s"]))
            print(f"turns {row} seed {seed}: success {before['eval/accuracy']:.2f} -> "
                  f"{s['eval/accuracy_after']:.2f}", flush=True)
            write_json(out / "turns.json", result)
    trained = out / "turns" / f"run-turn-{args.turn_seeds[0]}"
    result["variance"] = {}
    for point, adapter in (("initial", None), ("trained", trained)):
        if adapter is not None and not (adapter / "checkpoint-last").is_dir():
            continue
        vdir = out / "turns" / f"variance-{point}"
        subprocess.run([sys.executable, "-m", "pg_lm.cli", "variance", *VARIANCE_FLAGS, "--batches",
                        str(args.turn_batches), "--reference-batches", str(args.turn_batches), "--seed", "1",
                        "--progress", "false", "--output-dir", str(vdir),
                        *(["--adapter", str(adapter)] if adapter else [])], check=True, cwd=ROOT)
        result["variance"][point] = json.loads((vdir / "variance.json").read_text())
    result["load1_end"] = load1()
    write_json(out / "turns.json", result)
    return result


def _points(variance: dict, row: str, key: str, fmt: str) -> str:
    cells = [format(variance[p]["results"][row][key], fmt) if p in variance and row in variance[p]["results"]
             else "—" for p in ("initial", "trained")]
    return " / ".join(cells)


def render_turns(out: Path) -> list[str]:
    """The multi-turn table's lines (none without ``turns.json``)."""
    path = out / "turns.json"
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    var = m.get("variance", {})
    lines = [f"**Guess the number (1..15, at most 4 turns), SmolLM2-135M-Instruct** (LoRA r16, 4 games x 8 "
             f"episodes per step, {m['steps']} steps per run, seeds {', '.join(map(str, m['seeds']))}; held-out "
             f"success on 100 games, greedy; gradient variance at the initial model / the `turn` run's checkpoint, "
             f"K = {m['var_batches']})\n",
             "| credit | advantage of an action token | held-out success: before -> after, median (each seed) "
             "| mean return after (median) | gradient SNR (noise removed): initial / trained "
             "| total variance: initial / trained |", "|---|---|---|---:|---|---|"]
    for row, runs in m["rows"].items():
        if not runs:
            continue
        after = [r["success_after"] for r in runs]
        each = ", ".join(f"{a:.2f}" for a in after)
        lines.append(f"| {TURN_ROWS[row][0]} (`{row}`) | {TURN_ROWS[row][1]} | {runs[0]['success_before']:.2f} -> "
                     f"**{statistics.median(after):.2f}** ({each}) | {statistics.median(r['return_after'] for r in runs):.2f} "
                     f"| {_points(var, row, 'snr_debiased', '.2f')} | {_points(var, row, 'variance', '.3g')} |")
    return lines + [""]
