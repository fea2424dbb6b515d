r"""pg_lm vs TRL's GRPOTrainer: wall-clock training time to a held-out greedy accuracy.

Each library trains at its own recommended defaults on the arithmetic task with the
embedded SmolLM2-135M-Instruct:

* pg_lm: ``recipes/arithmetic.py`` DEFAULTS, read from the file at run time (RLOO, 4
  prompts x 8 samples, 16 new tokens, LoRA r16, its lr and ``mixed_precision``; the JSON
  records them and the precision "auto" resolved to), except that this script's cap
  replaces the recipe's ``max_seconds`` (so its cosine lr decay runs over ``max_steps``)
  and ``--max-steps`` its ``max_steps`` (default: 400);
* TRL: ``GRPOConfig`` defaults, except the task's sizes, taken from the recipe --
  ``num_generations`` (8), ``per_device_train_batch_size`` (4 prompts x 8), ``max_completion_length`` (16),
  ``max_steps`` -- and what keeps it off the Hub and the disk (``report_to="none"``,
  ``save_strategy="no"``) and on the CPU (``use_cpu=True``). So TRL keeps its lr 1e-6
  with linear decay over ``max_steps``, bf16, gradient checkpointing, GRPO std scaling,
  and its own shuffled prompt order.

Every ``--eval-every`` steps (and before the first) both are evaluated by the same
function: greedy decoding, 16 new tokens, chat template, pg_lm's ``exact_match`` on the
same 100 held-out prompts (``benchmarks/_lm_setup.greedy_accuracy``). The clock is the
wall time since the first training step **minus evaluation time**; the reported time is
the clock at the first evaluation reaching ``--time-to-accuracy`` (so it is resolved to
``--eval-every`` steps). A run stops there, at ``--max-seconds`` on that clock, or at
``--max-steps``; then it reports "not reached within cap". The libraries run one after
the other, each in its own subprocess.

    python benchmarks/lm_time_to_accuracy.py --time-to-accuracy 0.5 --max-seconds 1800 \
        --output runs/bench/lm_time_to_accuracy.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load1, machine_info, max_rss_mb, write_json  # noqa: E402


class Clock:
    """Wall time since construction, minus the time spent inside ``paused()``."""

    def __init__(self):
        self.start, self.excluded = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0


class Tracker:
    """The accuracy curve and the stopping rule, shared by both libraries."""

    def __init__(self, evaluate, target: float, max_seconds: float):
        self.evaluate, self.target, self.max_seconds = evaluate, target, max_seconds
        self.clock, self.curve, self.reached = Clock(), [], None

    def eval_now(self, step: int) -> bool:
        """Evaluate (off the clock); True when the target is reached."""
        with self.clock.paused():
            acc = self.evaluate()
        self.curve.append(dict(step=step, train_s=self.clock.now(), accuracy=acc))
        print(f"  step {step}: accuracy {acc:.2f} at {self.clock.now():.1f} s (eval excluded)", flush=True)
        if acc >= self.target and self.reached is None:
            self.reached = self.curve[-1]
        return self.reached is not None

    def out_of_time(self) -> bool:
        return self.clock.now() >= self.max_seconds

    def result(self, steps: int, stop_reason: str, config: dict) -> dict:
        return dict(reached=self.reached is not None, stop_reason=stop_reason, steps=steps,
                    time_to_accuracy_s=self.reached["train_s"] if self.reached else None,
                    steps_to_accuracy=self.reached["step"] if self.reached else None,
                    result=(f"{self.reached['train_s']:.1f} s" if self.reached else
                            f"not reached within cap ({self.max_seconds:.0f} s / {steps} steps)"),
                    final_accuracy=self.curve[-1]["accuracy"], train_s=self.clock.now(),
                    eval_s_excluded=self.clock.excluded, curve=self.curve, max_rss_mb=max_rss_mb(), config=config)


def pg_lm_run(conn, args, output_dir: str) -> None:
    from _lm_setup import build_pg_lm, greedy_accuracy

    trainer = build_pg_lm(dict(max_steps=args.max_steps, max_seconds=None), output_dir)
    lm, bf16 = trainer.acc.unwrap_model(trainer.policy).lm, trainer.acc.mixed_precision == "bf16"
    # the clock starts now: the first training step follows the (excluded) first evaluation
    track = Tracker(lambda: greedy_accuracy(lm, trainer.tok, bf16), args.time_to_accuracy, args.max_seconds)
    stop = "target" if track.eval_now(0) else "max_steps"
    while stop != "target" and trainer.step < args.max_steps:
        if track.out_of_time():
            stop = "max_seconds"
            break
        trainer.train_step()
        if trainer.step % args.eval_every == 0 or trainer.step == args.max_steps:
            stop = "target" if track.eval_now(trainer.step) else stop
    config = dict(vars(trainer.cfg), resolved_mixed_precision=trainer.acc.mixed_precision)
    conn.send(track.result(trainer.step, stop, config))


def trl_config(args, output_dir: str) -> dict:
    from _lm_setup import recipe_defaults

    r = recipe_defaults()  # the task's sizes, as pg_lm's recipe sets them
    kw = dict(output_dir=output_dir, num_generations=r["samples_per_prompt"],
              per_device_train_batch_size=r["prompts_per_step"] * r["samples_per_prompt"],
              max_completion_length=r["max_new_tokens"], max_steps=args.max_steps, use_cpu=True)
    if args.trl_bf16 != "default":
        kw["bf16"] = args.trl_bf16 == "true"
    return kw


def trl_run(conn, args, output_dir: str) -> None:
    from transformers import TrainerCallback

    from _lm_setup import build_trl, greedy_accuracy
    from pg_lm.tasks.arithmetic import arithmetic_datasets

    train, _ = arithmetic_datasets()
    trainer = build_trl(list(train["prompt"]), list(train["answer"]), trl_config(args, output_dir))
    bf16 = bool(trainer.args.bf16)
    track = Tracker(lambda: greedy_accuracy(trainer.model, trainer.processing_class, bf16),
                    args.time_to_accuracy, args.max_seconds)
    state = {"stop": "max_steps"}

    class TimeToAccuracy(TrainerCallback):
        def on_train_begin(self, a, s, control, **kw):
            track.clock = Clock()  # from here on: the first training step follows the (excluded) first evaluation
            if track.eval_now(0):
                state["stop"], control.should_training_stop = "target", True

        def on_step_end(self, a, s, control, **kw):
            due = s.global_step % args.eval_every == 0 or s.global_step == args.max_steps
            if due and track.eval_now(s.global_step):
                state["stop"], control.should_training_stop = "target", True
            elif track.out_of_time():
                state["stop"], control.should_training_stop = "max_seconds", True

    trainer.add_callback(TimeToAccuracy())
    trainer.train()
    config = {k: str(v) for k, v in trainer.args.to_dict().items()}
    conn.send(track.result(trainer.state.global_step, state["stop"], config))


def run_in_subprocess(target, args, output_dir: str) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, args, output_dir))
    proc.start()
    child.close()
    try:
        return parent.recv()
    except EOFError:  # it died before reporting; its traceback is on stderr
        proc.join()
        return dict(reached=False, error=f"worker exited with code {proc.exitcode}")
    finally:
        proc.join()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time-to-accuracy", type=float, default=0.5, help="held-out greedy accuracy to reach")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="cap on the training clock (eval excluded)")
    p.add_argument("--max-steps", type=int, default=400,
                   help="step budget, the recipe's max_steps (TRL's linear lr decay spans it)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    p.add_argument("--libraries", nargs="+", choices=("pg_lm", "trl"), default=["pg_lm", "trl"])
    p.add_argument("--trl-bf16", choices=("default", "true", "false"), default="default",
                   help="TRL precision; default = GRPOConfig's own default (bf16=True)")
    p.add_argument("--output", default="runs/bench/lm_time_to_accuracy.json")
    args = p.parse_args(argv)
    if args.eval_every < 1 or args.max_steps < 1 or args.max_seconds <= 0:
        p.error("--eval-every and --max-steps must be >= 1, --max-seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_lm_tta_")
    result = dict(benchmark="lm_time_to_accuracy", load1_start=load1(), machine=machine_info(),
                  target_accuracy=args.time_to_accuracy, max_seconds=args.max_seconds, max_steps=args.max_steps,
                  eval_every=args.eval_every, eval="greedy, 16 new tokens, chat template, exact_match, 100 held-out "
                  "prompts; evaluation time excluded from the clock")
    runs = {"pg_lm": pg_lm_run, "trl": trl_run}
    for name in args.libraries:
        print(f"{name}: training to accuracy {args.time_to_accuracy} ...", flush=True)
        result[name] = run_in_subprocess(runs[name], args, f"{tmp}/{name}")
        print(f"{name}: {result[name].get('result', result[name].get('error'))}", flush=True)
    result["load1_end"] = load1()
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
