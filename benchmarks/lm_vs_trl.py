"""pg_lm vs TRL's GRPOTrainer: training speed on the arithmetic task with the same configuration.

What is measured, per library, over the timed blocks (warm-up excluded):

* median step time (sample 16 completions + score + one optimizer step);
* generation tokens/s: completion tokens / time spent generating;
* training tokens/s: completion tokens / time in the update (forward, backward, clip, AdamW);
* peak resident memory while its blocks ran (a sampling thread in its process), and the
  process's lifetime peak (``ru_maxrss``, model loading included);
* mean reward of every step (warm-up included), and MFU of the update:
  6 x parameters x tokens run through the model in the update / update time, against
  the matmul throughput measured here (2048^2 @ 2048^2, repeated) in the precision the
  library trained in, and against the bf16 one.

How: each library runs in its own subprocess (so memory is per library and neither sees
the other's allocator state); the parent makes them take turns -- warm-up steps for each,
then ``--blocks`` blocks of ``--steps`` steps, pg_lm block, TRL block, pg_lm block, ...
-- so slow drifts of the machine hit both alike. While one runs the other waits on a pipe.

Same configuration: the embedded SmolLM2-135M-Instruct, full fine-tuning, the same
prompts in the same order (pg_lm's own order, handed to TRL with shuffling off), 4
prompts x 4 samples per step, at most 24 new tokens, temperature 1.0, top-p 1, no top-k,
the chat template, AdamW lr 1e-5 constant, grad-norm clip 1.0, no KL (TRL beta=0), one
optimizer step per rollout, token-mean loss (TRL's "dapo"), group-mean baseline scaled
by the group std (TRL's GRPO advantage; ``--pg-lm-baseline recipe`` keeps the recipe's
leave-one-out). TRL's gradient checkpointing is off (pg_lm has none; it only slows TRL).
Precision: ``--trl-bf16 auto`` runs TRL with bf16=True and bf16=False side by side for a
few alternating steps and keeps the faster; pg_lm then uses the same (``--pg-lm-precision``).

Process settings: pg_lm's process applies its CPU layer's process settings first, as the CLI and
the recipes do (``pg_lm.lm.cpu.process.apply_process_settings``: transparent huge pages for torch's
CPU tensors, ``THP_MEM_ALLOC_ENABLE=1``, and its glibc malloc settings);
TRL's process gets the environment as it was (``--trl-process-tuning`` gives it the same
settings through the environment; the JSON's ``config.trl_process_env`` says which).

Timing: pg_lm -- wall clock around ``Trainer.train_step()``; its ``perf/gen_s`` (sampling)
and ``perf/train_s`` (the update). TRL -- a TrainerCallback from ``on_step_begin`` to
``on_step_end``; generation = time inside ``GRPOTrainer._generate`` (chat template,
tokenization, ``model.generate``, decoding -- what pg_lm's sampling does), update =
step time minus time inside ``_generate_and_score_completions`` (generation + reward
scoring + advantages); reward and completion lengths from TRL's own logged metrics.

    python benchmarks/lm_vs_trl.py --output runs/bench/lm_vs_trl.json
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RssSampler, load1, machine_info, matmul_peak, max_rss_mb, median, write_json  # noqa: E402

SAME = dict(prompts_per_step=4, samples_per_prompt=4, max_new_tokens=24, temperature=1.0, top_p=1.0, top_k=0,
            lr=1e-5, lora_r=0, kl_coef=0.0, chat_template=True, max_grad_norm=1.0, weight_decay=0.0,
            warmup_steps=0, lr_schedule="constant", ppo_epochs=1, num_minibatches=1, loss_agg="token-mean", seed=0)
ROWS = SAME["prompts_per_step"] * SAME["samples_per_prompt"]
# process-level settings pg_lm applies to itself (pg_lm.lm.cpu.process.apply_process_settings); TRL's process
# gets the environment as the user had it (read before anything sets it; pg_lm sets no MALLOC_* variable),
# or these with --trl-process-tuning
_USER_THP = os.environ.get("THP_MEM_ALLOC_ENABLE")
from pg_lm.lm.cpu.process import MALLOC_ENV  # noqa: E402

PG_LM_TUNING = {"THP_MEM_ALLOC_ENABLE": "1", **MALLOC_ENV}
_USER_ENV = {**{k: os.environ.get(k) for k in PG_LM_TUNING}, "THP_MEM_ALLOC_ENABLE": _USER_THP}


@contextlib.contextmanager
def _environment(values: dict):
    """os.environ with ``values`` (None: unset) while a worker is spawned (a child copies it at start)."""
    saved = {k: os.environ.get(k) for k in values}
    def put(vals):
        for k, v in vals.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    put(values)
    try:
        yield
    finally:
        put(saved)


def trl_environment(args) -> dict:
    return dict(PG_LM_TUNING) if args.trl_process_tuning else dict(_USER_ENV)


def pg_lm_overrides(args, total_steps: int, trl_bf16: bool) -> dict:
    kw = dict(SAME, max_steps=max(total_steps, 1), max_seconds=None, eval_every=0)
    if args.pg_lm_baseline == "grpo":
        kw.update(estimator="reinforce", baseline="group_mean", scale_rewards=True)
    if args.pg_lm_precision in ("bf16", "no"):
        kw["mixed_precision"] = args.pg_lm_precision
    elif args.pg_lm_precision == "match-trl":
        kw["mixed_precision"] = "bf16" if trl_bf16 else "no"
    kw["skip_zero_advantage"] = args.pg_lm_skip_zero_advantage == "true"
    return kw


def trl_config(bf16: bool, total_steps: int, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=total_steps, per_device_train_batch_size=ROWS,
                gradient_accumulation_steps=1, num_generations=SAME["samples_per_prompt"],
                max_completion_length=SAME["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                learning_rate=SAME["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
                gradient_checkpointing=False, bf16=bf16, use_cpu=True, seed=0, logging_steps=1,
                shuffle_dataset=False)


# ---------------------------------------------------------------- pg_lm worker (own process)
def _pg_lm_step(trainer) -> dict:
    from pg_lm.lm.sampling import encode_prompts

    prompts, _ = trainer.prompts(trainer.step)
    unique_prompt_tokens = int(encode_prompts(trainer.tok, prompts, True, None)[1].sum())
    t0 = time.perf_counter()
    s = trainer.train_step()
    step_s = time.perf_counter() - t0
    completion_tokens = s["completion/length"] * ROWS
    # the update runs each prompt once per group (shared KV cache), then the completions
    # rows with zero advantage may be left out of the update (trained_frac < 1): count what ran, approximately
    frac = s["perf/trained_frac"]
    return dict(step_s=step_s, gen_s=s["perf/gen_s"], train_s=s["perf/train_s"], reward=s["reward/mean"],
                completion_tokens=completion_tokens, update_tokens=frac * (unique_prompt_tokens + completion_tokens),
                trained_frac=frac, first_prompt=prompts[0])


def pg_lm_worker(conn, overrides: dict, total_steps: int, output_dir: str) -> None:
    from pg_lm.lm.cpu.process import apply_process_settings

    apply_process_settings()  # first, as the CLI and the recipes do: before torch allocates

    from _lm_setup import build_pg_lm, pg_lm_step_prompts

    trainer = build_pg_lm(overrides, output_dir)
    prompts, answers = pg_lm_step_prompts(trainer, total_steps)
    n_params = sum(p.numel() for p in trainer.params)
    config = dict(vars(trainer.cfg), resolved_mixed_precision=trainer.acc.mixed_precision)
    conn.send(dict(prompts=prompts, answers=answers, n_params=n_params, config=config))
    while (n := conn.recv()) is not None:
        with RssSampler() as rss:
            rows = [_pg_lm_step(trainer) for _ in range(n)]
        conn.send(dict(steps=rows, peak_rss_mb=rss.peak_mb))
    conn.send(dict(max_rss_mb=max_rss_mb()))


# ---------------------------------------------------------------- TRL worker (own process)
def _block_callback(conn, starts: set, trainer):
    """Times each step, and at each block start reports the last block and waits for the parent."""
    from transformers import TrainerCallback

    from _lm_setup import CallTimer

    gen, rollout = CallTimer(trainer, "_generate"), CallTimer(trainer, "_generate_and_score_completions")

    class Blocks(TrainerCallback):
        def __init__(self):
            self.rows, self.rss, self.last_tokens, self.t0 = [], None, 0, 0.0

        def report(self):
            if self.rss is not None:
                self.rss.__exit__(None, None, None)
                conn.send(dict(steps=self.rows, peak_rss_mb=self.rss.peak_mb))
            self.rows, self.rss = [], None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step in starts:
                self.report()
                conn.recv()  # the block length: max_steps already fixes where blocks end
                self.rss = RssSampler().__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - self.t0
            self.rows.append(dict(step_s=step_s, gen_s=gen.take(), train_s=step_s - rollout.take()))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and self.rows:
                row, tokens = self.rows[-1], logs["num_tokens"]
                row.update(reward=logs["reward"], completion_tokens=logs["completions/mean_length"] * ROWS,
                           update_tokens=tokens - self.last_tokens)  # prompts x rows + completions
                self.last_tokens = tokens

        def on_train_end(self, args, state, control, **kw):
            self.report()

    return Blocks()


def trl_worker(conn, prompts, answers, trl_kwargs: dict, segments: list[int]) -> None:
    from _lm_setup import build_trl

    trainer = build_trl(prompts, answers, trl_kwargs)
    first_prompts = []
    inner = trainer._generate_and_score_completions

    def record(batch):
        first_prompts.append(batch[0]["prompt"][-1]["content"])
        return inner(batch)

    trainer._generate_and_score_completions = record
    starts = {sum(segments[:i]) for i in range(len(segments))}
    trainer.add_callback(_block_callback(conn, starts, trainer))
    conn.send(dict(n_params=sum(p.numel() for p in trainer.model.parameters()), bf16=trainer.args.bf16,
                   mixed_precision=str(trainer.accelerator.mixed_precision), optim=str(trainer.args.optim)))
    trainer.train()
    assert conn.recv() is None
    conn.send(dict(max_rss_mb=max_rss_mb(), first_prompts=first_prompts))


# ---------------------------------------------------------------- parent
def _start(ctx, target, *args):
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _run_segments(workers: dict, segments: list[int], warmup: int) -> dict:
    """Alternate the workers segment by segment; returns each one's block reports."""
    blocks = {name: [] for name in workers}
    for i, n in enumerate(segments):
        for name, (_, conn) in workers.items():
            print(f"  block {i + 1}/{len(segments)}: {name} x {n} steps", flush=True)
            conn.send(n)
            blocks[name].append(dict(conn.recv(), warmup=bool(warmup) and i == 0))
    return blocks


def _finish(workers: dict) -> dict:
    out = {}
    for name, (proc, conn) in workers.items():
        conn.send(None)
        out[name] = conn.recv()
        proc.join(timeout=120)
    return out


def _segments(warmup: int, steps: int, blocks: int) -> list[int]:
    return ([warmup] if warmup else []) + [steps] * blocks


def probe_trl_bf16(ctx, prompts, answers, probe_steps: int, tmp: str, env: dict) -> dict:
    """TRL with bf16=True and with bf16=False, alive side by side and alternating step by step
    (1 warm-up + ``probe_steps`` each); the faster wins. If bf16 fails here, fp32 it is."""
    segments, workers = [1] * (1 + probe_steps), {}
    try:
        for bf16 in (True, False):
            kw = trl_config(bf16, len(segments), f"{tmp}/probe_{bf16}")
            with _environment(env):
                workers[str(bf16).lower()] = _start(ctx, trl_worker, prompts, answers, kw, segments)
            workers[str(bf16).lower()][1].recv()
        blocks = _run_segments(workers, segments, warmup=1)
        _finish(workers)
    except (EOFError, OSError) as e:  # a worker died: that setting does not run on this machine
        for proc, _ in workers.values():
            proc.kill()
        return dict(choice=False, probe_median_step_s=None, probe_error=repr(e))
    probe = {k: median(s["step_s"] for b in bl if not b["warmup"] for s in b["steps"]) for k, bl in blocks.items()}
    return dict(choice=probe["true"] < probe["false"], probe_median_step_s=probe)


def summarize(blocks: list[dict], final: dict, n_params: int, peaks: dict, bf16: bool) -> dict:
    timed = [s for b in blocks if not b["warmup"] for s in b["steps"]]
    every = [s for b in blocks for s in b["steps"]]
    tot = lambda key: sum(s[key] for s in timed)
    train_s = tot("train_s")
    flops = 6 * n_params * tot("update_tokens") / train_s  # achieved FLOP/s in the update
    return {
        "median_step_s": median(s["step_s"] for s in timed),
        "median_gen_s": median(s["gen_s"] for s in timed),
        "median_train_s": median(s["train_s"] for s in timed),
        "gen_tokens_per_s": tot("completion_tokens") / tot("gen_s"),
        "train_tokens_per_s": tot("completion_tokens") / train_s,
        "mfu_update": flops / peaks["bfloat16" if bf16 else "float32"]["flops_per_s"],
        "mfu_update_vs_bf16_peak": flops / peaks["bfloat16"]["flops_per_s"],
        "mfu_update_vs_fp32_peak": flops / peaks["float32"]["flops_per_s"],
        "peak_rss_mb": max(b["peak_rss_mb"] for b in blocks if not b["warmup"]),
        "max_rss_mb_process_lifetime": final["max_rss_mb"],
        "reward_mean": sum(s.get("reward", float("nan")) for s in timed) / len(timed),
        "reward_per_step": [s.get("reward") for s in every],
        "mean_completion_tokens": tot("completion_tokens") / len(timed) / ROWS,
        "mean_trained_frac": sum(s.get("trained_frac", 1.0) for s in timed) / len(timed),
        "timed_steps": len(timed),
        "n_params": n_params,
        "steps": every,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block (K)")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per library")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per library")
    p.add_argument("--trl-bf16", choices=("auto", "true", "false"), default="auto",
                   help="TRL bf16 autocast; auto = time both briefly and take the faster")
    p.add_argument("--trl-probe-steps", type=int, default=3, help="timed steps per setting in the auto probe")
    p.add_argument("--pg-lm-baseline", choices=("grpo", "recipe"), default="grpo",
                   help="grpo: group mean / group std, as TRL; recipe: the recipe's leave-one-out")
    p.add_argument("--pg-lm-precision", choices=("match-trl", "recipe", "bf16", "no"), default="match-trl",
                   help="pg_lm mixed precision: match-trl = bf16 autocast iff TRL uses it; recipe = the "
                   "recipe's setting")
    p.add_argument("--pg-lm-skip-zero-advantage", choices=("true", "false"), default="true",
                   help="pg_lm's default (true) leaves rows with zero advantage out of the backward pass (the same "
                   "gradient); false runs every row through it, as TRL does: the like-for-like compute")
    p.add_argument("--trl-process-tuning", action="store_true",
                   help="give TRL's process the allocator settings pg_lm applies to its own (transparent huge pages "
                   "for torch tensors, glibc malloc thresholds) through the environment; default: TRL runs in the "
                   "environment as it was")
    p.add_argument("--output", default="runs/bench/lm_vs_trl.json")
    args = p.parse_args(argv)
    if min(args.steps, args.blocks) < 1 or args.warmup < 0:
        p.error("--steps and --blocks must be >= 1, --warmup >= 0")
    return args


def choose_trl_bf16(args, ctx, tmp: str) -> dict:
    if args.trl_bf16 != "auto":
        return dict(choice=args.trl_bf16 == "true", probe_median_step_s=None)
    from pg_lm.tasks.arithmetic import arithmetic_datasets

    print("probing TRL bf16 on / off ...", flush=True)
    train, _ = arithmetic_datasets()
    n = SAME["prompts_per_step"] * (1 + args.trl_probe_steps)  # any prompts do for a speed probe
    return probe_trl_bf16(ctx, list(train["prompt"][:n]), list(train["answer"][:n]), args.trl_probe_steps, tmp,
                          trl_environment(args))


def measure_peaks(before: dict | None = None) -> dict:
    """bf16 and fp32 matmul peaks; with ``before``, the higher (less disturbed) of the two measurements."""
    now = {d: matmul_peak(dtype=d) for d in ("bfloat16", "float32")}
    return now if before is None else {d: max(before[d], now[d], key=lambda m: m["flops_per_s"]) for d in now}


def run_both(args, ctx, tmp: str, trl_bf16: bool) -> dict:
    """Start both workers, alternate their blocks, collect everything they reported."""
    segments = _segments(args.warmup, args.steps, args.blocks)
    total = sum(segments)
    pg = _start(ctx, pg_lm_worker, pg_lm_overrides(args, total, trl_bf16), total, f"{tmp}/pg_lm")
    hello_pg = pg[1].recv()
    prompts, answers = hello_pg.pop("prompts"), hello_pg.pop("answers")
    trl_kw = trl_config(trl_bf16, total, f"{tmp}/trl")
    with _environment(trl_environment(args)):
        trl = _start(ctx, trl_worker, prompts, answers, trl_kw, segments)
    hello_trl = trl[1].recv()
    blocks = _run_segments({"pg_lm": pg, "trl": trl}, segments, args.warmup)
    final = _finish({"pg_lm": pg, "trl": trl})
    expected = [prompts[i * SAME["prompts_per_step"]] for i in range(total)]  # first prompt of each step
    used = [s["first_prompt"] for b in blocks["pg_lm"] for s in b["steps"]]
    same = final["trl"].pop("first_prompts") == expected == used
    return dict(hello_pg=hello_pg, hello_trl=hello_trl, trl_kw=trl_kw, blocks=blocks, final=final, same=same)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx, tmp = mp.get_context("spawn"), tempfile.mkdtemp(prefix="bench_lm_vs_trl_")
    result = dict(benchmark="lm_vs_trl", load1_start=load1(), machine=machine_info())
    print("measuring matmul throughput ...", flush=True)
    peaks = measure_peaks()
    result["trl_bf16"] = choose_trl_bf16(args, ctx, tmp)
    bf16 = result["trl_bf16"]["choice"]
    run = run_both(args, ctx, tmp, bf16)
    result["load1_end"] = load1()
    result["same_prompts_checked"] = run["same"]
    result["matmul_peak"] = peaks = measure_peaks(peaks)
    pg_bf16 = run["hello_pg"]["config"]["resolved_mixed_precision"] == "bf16"
    result["pg_lm"] = summarize(run["blocks"]["pg_lm"], run["final"]["pg_lm"], run["hello_pg"]["n_params"], peaks,
                                pg_bf16)
    result["trl"] = summarize(run["blocks"]["trl"], run["final"]["trl"], run["hello_trl"]["n_params"], peaks, bf16)
    result["step_time_ratio"] = result["pg_lm"]["median_step_s"] / result["trl"]["median_step_s"]
    result["config"] = dict(SAME, warmup=args.warmup, steps_per_block=args.steps, blocks=args.blocks,
                            model="smollm2-135m-instruct", pg_lm_baseline=args.pg_lm_baseline,
                            pg_lm_precision=args.pg_lm_precision, pg_lm=run["hello_pg"]["config"],
                            pg_lm_skip_zero_advantage=args.pg_lm_skip_zero_advantage,
                            trl_process_env=trl_environment(args),
                            trl={**run["trl_kw"], **run["hello_trl"]})
    result["notes"] = NOTES
    write_json(args.output, result)
    print_table(result)
    return 0 if result["same_prompts_checked"] else 1


NOTES = [
    "Each library runs in its own subprocess; blocks alternate pg_lm, TRL, pg_lm, TRL, ...; warm-up blocks are "
    "excluded from all figures except reward_per_step.",
    "pg_lm step time: wall clock around Trainer.train_step(); gen/update from its perf/gen_s and perf/train_s.",
    "TRL step time: TrainerCallback on_step_begin -> on_step_end (generation, scoring, forward/backward, clip, "
    "optimizer step; TRL's logging after on_step_end is outside). TRL generation: time inside "
    "GRPOTrainer._generate (chat template, tokenize, model.generate, decode; instance wrapper); TRL update: "
    "step time minus time inside _generate_and_score_completions. Reward and completion lengths: TRL's logged "
    "'reward' and 'completions/mean_length'.",
    "Training tokens/s = completion tokens / update seconds. MFU = 6 x params x update tokens / update seconds / "
    "measured matmul FLOP/s of the precision the library trained in (mfu_update; the _vs_bf16_peak and "
    "_vs_fp32_peak variants use one peak for both; a CPU whose bf16 matmul is slower than fp32 puts fp32 "
    "training above 100% of the bf16 peak). Peaks: 2048^2 @ 2048^2 matmuls for 3 s, measured at start and end, "
    "the higher kept. Update tokens are real "
    "(non-pad) tokens run through the model in the update: pg_lm runs each prompt once per group (shared KV "
    "cache) + the completions, TRL every prompt copy + the completions (from the delta of its num_tokens). "
    "Padding and attention FLOPs are not counted. pg_lm with skip_zero_advantage (its default) leaves rows whose "
    "advantage is 0 out of the update; its update tokens are then scaled by the fraction of rows trained "
    "(mean_trained_frac), an approximation; training tokens/s still counts every completion token of the batch.",
    "peak_rss_mb: sampled every 10 ms in the library's process while its timed blocks ran; "
    "max_rss_mb_process_lifetime: ru_maxrss of that process (includes model loading).",
]


def print_table(r: dict) -> None:
    rows = [("median step (s)", "median_step_s", "{:.3f}"), ("generation tok/s", "gen_tokens_per_s", "{:.1f}"),
            ("training tok/s", "train_tokens_per_s", "{:.1f}"), ("MFU (update)", "mfu_update", "{:.1%}"),
            ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"), ("reward (mean)", "reward_mean", "{:.3f}")]
    print(f"\n{'':22}{'pg_lm':>12}{'TRL':>12}")
    for label, key, fmt in rows:
        print(f"{label:22}{fmt.format(r['pg_lm'][key]):>12}{fmt.format(r['trl'][key]):>12}")
    print(f"step_time_ratio (pg_lm / TRL): {r['step_time_ratio']:.3f}; TRL bf16: {r['trl_bf16']['choice']}; "
          f"load1 {r['load1_start']:.2f} -> {r['load1_end']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
