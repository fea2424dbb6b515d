"""Time pg_lm's update (forward, backward, clip, AdamW) alone, at lm_vs_trl.py's configuration.

One rollout of the embedded model (4 prompts x 4 samples, up to 24 new tokens, full
fine-tuning, fp32 or ``--precision bf16``) is drawn after ``--warmup`` whole training steps; then
``Trainer.update`` runs ``--repeats`` times on it with every row's advantage made non-zero
(so no row is skipped: the like-for-like compute). Prints each update's seconds, its minor page faults, the
median and the process's peak resident memory; ``--output`` writes them as JSON. For A/B tests of changes to the update path: run it
on each version, alternating, on an idle machine.

    python benchmarks/update_step.py --repeats 5
    python benchmarks/update_step.py --repeats 3 --profile 15   # and where the time goes
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pg_lm  # noqa: E402
from pg_lm.lm.cpu.process import apply_process_settings  # noqa: E402

apply_process_settings()  # before torch allocates, as the CLI and the recipes do

import lm_vs_trl as B  # noqa: E402
from _common import load1, machine_info, median, write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3, help="whole training steps before the timed updates")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after the timed updates, run one more under torch.profiler and print its top ROWS ops")
    p.add_argument("--precision", choices=("bf16", "no"), default="no", help="pg_lm's --mixed-precision")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    from _lm_setup import build_pg_lm

    bench_args = B.parse_args(["--pg-lm-precision", args.precision, "--pg-lm-skip-zero-advantage", "false"])
    trainer = build_pg_lm(B.pg_lm_overrides(bench_args, args.warmup + args.repeats + 1, False), tempfile.mkdtemp())
    for _ in range(args.warmup):
        trainer.train_step()
    batch, _ = trainer.rollout()
    adv, ret = trainer.advantages(batch)
    adv = adv + 0.01 * batch.completion_mask  # every row live
    result = dict(benchmark="update_step", load1_start=load1(), machine=machine_info(),
                  completion_tokens=int(batch.completion_mask.sum()), pg_lm_file=pg_lm.__file__,
                  thp_mem_alloc_enable=os.environ.get("THP_MEM_ALLOC_ENABLE"), update_s=[], minor_faults=[])
    for _ in range(args.repeats):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        trainer.update(batch, adv, ret)
        result["update_s"].append(time.perf_counter() - t0)
        result["minor_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"update {result['update_s'][-1]:.3f} s, {result['minor_faults'][-1]} page faults", flush=True)
    result["median_update_s"], result["load1_end"] = median(result["update_s"]), load1()
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    print(f"median {result['median_update_s']:.3f} s over {args.repeats}, max RSS {result['max_rss_mb']:.0f} MB "
          f"(load1 {result['load1_start']:.2f}; "
          f"pg_lm from {pg_lm.__file__}, THP_MEM_ALLOC_ENABLE={result['thp_mem_alloc_enable']})")
    if args.profile:  # where the update's time goes: matmuls (aten::mm) against everything else
        from torch.profiler import profile

        with profile() as prof:
            trainer.update(batch, adv, ret)
        ops = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.profile))
        print(f"profiled update: {total:.2f} s of op self-time, matmuls {mm:.2f} s ({mm / total:.0%})")
        result.update(profiled_s=total, profiled_matmul_s=mm)
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
