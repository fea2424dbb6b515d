"""Reward per step, pg_lm vs TRL's GRPOTrainer, at lm_vs_trl.py's configuration, over several seeds.

One seeded run per library and seed is one draw of a noisy process: from the untrained
model ~2% of samples are correct, and whether an early step happens to contain a correct
sample decides when learning starts (pg_lm, seeds 0-5, 12 steps: 4, 9, 0, 3, 1 and 15 correct
samples of 192; BENCHMARKS.md). So "reward per step no worse" is judged over seeds: for each seed both
libraries train ``--steps`` steps on the same prompts in the same order (pg_lm's order for
that seed, handed to TRL), the same configuration as ``lm_vs_trl.py`` (SAME there: 4
prompts x 4 samples, 24 new tokens, temperature 1, full fine-tuning at lr 1e-5, GRPO
advantage, token-mean loss, no KL, fp32 or with ``--bf16`` both in bf16), and the correct samples of every step are
counted. Reported: each library's mean reward per step over all seeds and steps with its
standard error over seeds, and the per-seed paired difference. Nothing is timed here, so
the machine need not be idle.

``--coupled`` runs the two on common random numbers: before each step's sampling both reset
torch's generator to the same seed, and pg_lm's sampler draws each token with
``torch.multinomial`` as TRL's ``model.generate`` does (``_lm_setup.draw_by_multinomial``)
instead of its own inverse CDF -- the same distribution, so neither library samples
differently from an uncoupled run, but while the two models agree they draw the same
completions. TRL is unchanged. Each step records whether the two libraries' completions
were identical token for token (``same_completions``); the paired difference then loses
most of the sampling noise.

    python benchmarks/lm_reward_per_step.py --seeds 0 1 2 3 4 5 --steps 12 --output runs/bench/lm_reward_per_step.json
    python benchmarks/lm_reward_per_step.py --coupled --seeds 0 1 2 3 --steps 12 --output runs/bench/lm_reward_per_step_coupled.json
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm_vs_trl as B  # noqa: E402
from _common import machine_info, write_json  # noqa: E402


def pg_lm_rewards(conn, seed: int, steps: int, lr: float | None, output_dir: str, coupled: bool = False,
                  bf16: bool = False) -> None:
    """``lr`` None: only the prompts of ``steps`` steps are wanted, nothing is trained."""
    from pg_lm.lm.cpu.process import apply_process_settings

    apply_process_settings()  # before torch allocates, as the CLI and the recipes do

    from _lm_setup import build_pg_lm, couple_pg_lm, pg_lm_step_prompts

    completions = []
    if coupled:
        couple_pg_lm(seed, completions)

    args = B.parse_args(["--trl-bf16", "true" if bf16 else "false"])
    trainer = build_pg_lm({**B.pg_lm_overrides(args, steps, bf16), "seed": seed, "lr": lr or B.SAME["lr"]},
                          output_dir)
    prompts, answers = pg_lm_step_prompts(trainer, steps)
    rewards = [trainer.train_step()["reward/mean"] for _ in range(steps if lr is not None else 0)]
    conn.send(dict(prompts=prompts, answers=answers, rewards=rewards, completions=completions))


def trl_rewards(conn, prompts, answers, seed: int, steps: int, lr: float, output_dir: str,
                coupled: bool = False, bf16: bool = False) -> None:
    from transformers import TrainerCallback

    from _lm_setup import build_trl, couple_trl

    rewards = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    kw = {**B.trl_config(bf16, steps, output_dir), "seed": seed, "learning_rate": lr}
    trainer = build_trl(prompts, answers, kw, callbacks=[Log()])
    completions = []
    if coupled:
        couple_trl(trainer, seed, completions)
    trainer.train()
    conn.send(dict(rewards=rewards, completions=completions))


def _run(ctx, target, *args) -> dict:
    """Run ``target`` in its own process (lm_vs_trl's worker start) and return the one dict it sends."""
    proc, conn = B._start(ctx, target, *args)
    out = conn.recv()
    proc.join(timeout=120)
    return out


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def sign_test(diffs: list[float]) -> dict:
    """Seeds where pg_lm was ahead / behind / tied, and the exact two-sided sign-test p-value of
    "each is as likely to be ahead" (ties dropped). Unlike the standard error of the mean
    difference it does not hang on the few seeds where one library took off early."""
    ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = ahead + behind, min(ahead, behind)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return dict(seeds_pg_lm_ahead=ahead, seeds_trl_ahead=behind, seeds_tied=len(diffs) - n, sign_test_p=p)


def summarize(runs: list[dict], config: dict) -> dict:
    """Each library's mean reward per step over seeds (mean, standard error over seeds) and,
    with both libraries, the per-seed paired difference pg_lm - TRL."""
    libraries = [lib for lib in ("pg_lm", "trl") if all(lib in r for r in runs)]
    per_seed = {lib: [statistics.fmean(r[lib]) for r in runs] for lib in libraries}
    result = dict(benchmark="lm_reward_per_step", machine=machine_info(), config=config, runs=runs,
                  mean_reward_per_step_per_seed=per_seed)
    line = f"mean reward per step over {len(runs)} seeds x {config['steps']} steps:"
    for lib in libraries:
        result[f"{lib}_mean_reward_per_step"], result[f"{lib}_se"] = _mean_se(per_seed[lib])
        line += f" {lib} {result[f'{lib}_mean_reward_per_step']:.4f} (se {result[f'{lib}_se']:.4f})"
    if len(libraries) == 2:
        diff = [a - b for a, b in zip(per_seed["pg_lm"], per_seed["trl"])]
        result["paired_difference_mean"], result["paired_difference_se"] = _mean_se(diff)
        line += f"; pg_lm - TRL {result['paired_difference_mean']:+.4f} (se {result['paired_difference_se']:.4f})"
        result.update(sign_test(diff))
        line += (f"; seeds pg_lm ahead {result['seeds_pg_lm_ahead']}, TRL ahead {result['seeds_trl_ahead']},"
                 f" tied {result['seeds_tied']} (sign test p {result['sign_test_p']:.2f})")
        correct = {lib: sum(round(x * B.ROWS) for r in runs for x in r[lib]) for lib in libraries}
        line += f"; correct samples {correct['pg_lm']} vs {correct['trl']} of {B.ROWS * config['steps'] * len(runs)}"
    if runs and all("same_completions" in r for r in runs):
        result.update(coupling(runs))
        line += (f"; coupled: identical completions in {result['coupled_steps_identical']} of"
                 f" {result['coupled_steps']} steps, {result['coupled_seeds_identical_throughout']} of"
                 f" {len(runs)} seeds identical throughout")
    result["summary"] = line
    return result


def coupling(runs: list[dict]) -> dict:
    """For coupled runs: in how many steps the two libraries' completions were identical token for
    token, how many seeds stayed identical throughout, and each seed's first step that differed."""
    same = [r["same_completions"] for r in runs]
    return dict(coupled_steps=sum(map(len, same)), coupled_steps_identical=sum(map(sum, same)),
                coupled_seeds_identical_throughout=sum(all(s) for s in same),
                coupled_first_differing_step=[next((i for i, x in enumerate(s) if not x), None) for s in same])


def pool(paths: list[str]) -> dict:
    """The runs of several earlier outputs (same configuration, distinct seeds) as one result."""
    import json

    outs = [json.loads(Path(p).read_text()) for p in paths]
    config = outs[0]["config"]
    if any(o["config"] != config for o in outs):
        raise SystemExit(f"--pool: the files were run with different configurations: {[o['config'] for o in outs]}")
    runs = [r for o in outs for r in o["runs"]]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--pool: a seed appears twice: {sorted(seeds)}")
    return dict(summarize(runs, config), pooled_from=list(paths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--lr", type=float, default=B.SAME["lr"],
                   help="learning rate for both (0: no learning, the samplers alone)")
    p.add_argument("--libraries", nargs="+", choices=("pg_lm", "trl"), default=["pg_lm", "trl"],
                   help="which to run (pg_lm always runs to fix the prompts; its rewards are dropped if not listed)")
    p.add_argument("--coupled", action="store_true",
                   help="common random numbers: both reseeded before each step's sampling, pg_lm drawing by "
                        "torch.multinomial as model.generate does")
    p.add_argument("--bf16", action="store_true",
                   help="both in bf16: TRL with bf16=True, pg_lm with --mixed-precision bf16 (its bf16 sampling "
                        "copy and decode path); default: both in fp32")
    p.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                   help="train nothing: summarise the runs of these earlier outputs together")
    p.add_argument("--output", default="runs/bench/lm_reward_per_step.json")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.lr < 0 or (args.lr == 0 and "pg_lm" in args.libraries):
        p.error("--lr must be > 0 for pg_lm (it rejects lr 0); for lr 0 run --libraries trl")
    if args.coupled and args.libraries != ["pg_lm", "trl"]:
        p.error("--coupled compares the two libraries: run both (the default --libraries)")
    if args.pool:
        result = pool(args.pool)
    else:
        ctx, tmp = mp.get_context("spawn"), tempfile.mkdtemp(prefix="bench_reward_")
        runs = []
        for seed in args.seeds:
            pg_lr = args.lr if "pg_lm" in args.libraries else None  # else pg_lm only fixes the prompts
            out = dict(pg_lm=_run(ctx, pg_lm_rewards, seed, args.steps, pg_lr, f"{tmp}/pg_lm_{seed}", args.coupled,
                                     args.bf16))
            if "trl" in args.libraries:
                out["trl"] = _run(ctx, trl_rewards, out["pg_lm"]["prompts"], out["pg_lm"]["answers"], seed,
                                  args.steps, args.lr, f"{tmp}/trl_{seed}", args.coupled, args.bf16)
            run = {"seed": seed, **{lib: out[lib]["rewards"] for lib in args.libraries}}
            if args.coupled:
                run["same_completions"] = [a == b for a, b in zip(out["pg_lm"]["completions"], out["trl"]["completions"],
                                                                  strict=True)]
            runs.append(run)
            print(f"seed {seed}: correct per step " + "  ".join(
                f"{lib} {[round(r * B.ROWS) for r in run[lib]]}" for lib in args.libraries)
                + (f"  identical completions {[int(x) for x in run['same_completions']]}" if args.coupled else ""),
                flush=True)
        config = dict(B.SAME, lr=args.lr, steps=args.steps, **({"coupled": True} if args.coupled else {}),
                      **({"bf16": True} if args.bf16 else {}))
        result = summarize(runs, config)
    print(result["summary"])
    write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
