"""The arithmetic recipe sampled by transformers (``--generator hf``) and by a vLLM server
(``--generator vllm``), back to back, in the same time budget on this machine.

Each run is ``recipes/arithmetic.py`` with ``--max-seconds`` (the cosine decays over it) and its own
output folder; the rest is the recipe's. Reported per generator: optimizer steps done and steps per
minute of training (the summary's wall time up to the last step; evaluation and, for vLLM, the
server's start are outside the budget and reported apart), the median seconds of a step's sampling,
weight sync and update, the held-out greedy accuracy before and after, and the median and largest
sampler-learner log-prob gap. Run it on an otherwise idle machine: the two runs are compared.

    python benchmarks/generator_cpu.py --seconds 300 --output runs/bench/generator_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(generator: str, seconds: float, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "recipes/arithmetic.py"), "--generator", generator, "--max-seconds", str(seconds),
           "--output-dir", str(out), "--progress", "false", "--save-model", "false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{generator}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "perf/step_s" in r]
    med = lambda key: statistics.median(r[key] for r in steps) if steps and key in steps[0] else None
    gaps = [r["sampler/logp_gap"] for r in steps if "sampler/logp_gap" in r]
    train_s = steps[-1]["wall_s"] if steps else 0.0
    return {"generator": generator, "steps": summary["train/steps"], "train_s": train_s,
            "steps_per_min": 60 * summary["train/steps"] / train_s if train_s else None, "process_wall_s": wall,
            "accuracy_before": summary.get("eval/accuracy_before"), "accuracy_after": summary.get("eval/accuracy_after"),
            "median_step_s": med("perf/step_s"), "median_gen_s": med("perf/gen_s"), "median_sync_s": med("perf/sync_s"),
            "median_train_s": med("perf/train_s"), "median_logp_gap": statistics.median(gaps) if gaps else None,
            "max_logp_gap_max": max((r["sampler/logp_gap_max"] for r in steps if "sampler/logp_gap_max" in r), default=None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300.0, help="training budget of each run (--max-seconds)")
    p.add_argument("--generators", default="hf,vllm", help="comma-separated, run in this order")
    p.add_argument("--output-dir", default="runs/bench/generator_cpu", help="the runs' folders")
    p.add_argument("--output", default="runs/bench/generator_cpu.json")
    p.add_argument("extra", nargs="*", help="more recipe flags for both runs (after --)")
    args = p.parse_args(argv)
    results = [run(g, args.seconds, Path(args.output_dir) / g, args.extra) for g in args.generators.split(",")]
    for r in results:
        print(json.dumps(r))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"seconds": args.seconds, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
