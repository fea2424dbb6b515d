"""Time pg_lm's rollout (sampling 16 completions) alone at lm_vs_trl.py's configuration, decoding through
``pg_lm.lm.cpu.decode_llama`` ("fast"), through it without its fused q|k|v and gate|up GEMMs ("unfused":
the model's projection modules), and through the model's own forward ("model"), alternating in one process.

After ``--warmup`` whole training steps, ``Trainer.rollout()`` runs ``--repeats`` times in each way, the
order alternating (fast, unfused, model, model, unfused, fast, ...) so that slow drifts of the machine hit both alike; each
rollout reseeds torch's generator, so both ways sample from the same random numbers. Prints every rollout's
seconds and the medians; ``--output`` writes them as JSON. Run on an idle machine.

    python benchmarks/rollout_step.py --repeats 6                       # bf16 (the sampling copy), as --trl-bf16 true
    python benchmarks/rollout_step.py --repeats 6 --precision no        # fp32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_lm.lm.cpu.process import apply_process_settings  # noqa: E402

apply_process_settings()  # before torch allocates, as the CLI and the recipes do

import lm_vs_trl as B  # noqa: E402
from _common import load1, machine_info, median, write_json  # noqa: E402


def main(argv=None) -> int:
    import time

    import torch

    import pg_lm.lm.cpu.decode_llama as decode_llama
    from _lm_setup import build_pg_lm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=2, help="whole training steps before the timed rollouts")
    p.add_argument("--repeats", type=int, default=6, help="rollouts in each way")
    p.add_argument("--precision", choices=("bf16", "no"), default="bf16", help="pg_lm's --mixed-precision")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    bf16 = args.precision == "bf16"
    bench_args = B.parse_args(["--trl-bf16", "true" if bf16 else "false", "--pg-lm-skip-zero-advantage", "false"])
    trainer = build_pg_lm(B.pg_lm_overrides(bench_args, args.warmup + 1, bf16), tempfile.mkdtemp())
    for _ in range(args.warmup):
        trainer.train_step()
    supports = decode_llama.supports
    lm, _ = trainer.sampling_lm()
    result = dict(benchmark="rollout_step", load1_start=load1(), machine=machine_info(), precision=args.precision,
                  decode_llama_applies=supports(lm), rollout_s={"fast": [], "unfused": [], "model": []})
    fused = decode_llama.fused_projections
    ways = ("fast", "unfused", "model")
    try:
        for i in range(args.repeats):
            for way in ways if i % 2 == 0 else ways[::-1]:
                decode_llama.supports = supports if way != "model" else (lambda lm: False)
                decode_llama.fused_projections = fused if way == "fast" else (lambda lm, rows: (None, []))
                torch.manual_seed(i)
                t0 = time.perf_counter()
                trainer.rollout()
                result["rollout_s"][way].append(time.perf_counter() - t0)
                print(f"{way:5s} {result['rollout_s'][way][-1]:.3f} s", flush=True)
    finally:
        decode_llama.supports, decode_llama.fused_projections = supports, fused
    result["median_s"] = {way: median(ts) for way, ts in result["rollout_s"].items()}
    result["load1_end"] = load1()
    print(f"median rollout: decode_llama {result['median_s']['fast']:.3f} s, unfused "
          f"{result['median_s']['unfused']:.3f} s, the model's forward "
          f"{result['median_s']['model']:.3f} s ({args.precision}; load1 {result['load1_start']:.2f})")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
