"""The run around the step: evaluation before and after, the step budget and the time budget,
logging, the progress bar, checkpoints, SIGINT / SIGTERM, the summary, and a clean exit of every
process. The step itself is :meth:`pg_lm.lm.trainer.Trainer.train_step`.
"""

from __future__ import annotations

import signal
import time

import torch

from pg_lm.run.signals import Interrupted, stop_on_signals

from . import credit, monitor
from .checkpoint import save_checkpoint
from .engine import EngineError
from .evaluate import truncation_warning
from .peers import PeerWatch


def brief(metrics: dict) -> str:
    """``reward 0.500, accuracy 0.250, pass@4 0.750, ...`` for the console; an environment's evaluation
    (it has ``eval/turns``) as ``success 0.250, return 0.500, turns 3.100, ...``."""
    names = {"eval/accuracy": "success", "eval/reward": "return"} if "eval/turns" in metrics else {}
    show = [k for k in metrics if k in ("eval/reward", "eval/accuracy", "eval/truncated_frac", "eval/turns")
            or "pass@" in k]
    show.sort(key=lambda k: k != "eval/accuracy" if names else 0)
    return ", ".join(f"{names.get(k, k[5:])} {metrics[k]:.3f}" for k in show)


def train(tr) -> dict:
    """Run ``tr`` (a :class:`~pg_lm.lm.trainer.Trainer`) to ``max_steps`` (or ``max_seconds``); returns
    the summary written to summary.json. With several processes, an error in one stops the others
    with it (:mod:`.peers`)."""
    peers = PeerWatch(tr.acc.process_index) if tr.acc.num_processes > 1 else None
    try:
        return _run(tr)
    except Interrupted:
        raise
    except BaseException as e:
        if peers is not None:
            peers.failed(e)
        raise
    finally:
        if peers is not None:
            peers.close()
        if tr.engine is not None:  # (also on errors: no server outlives its run)
            tr.engine.close()


def _run(tr) -> dict:
    from tqdm.auto import tqdm

    cfg, acc, st = tr.cfg, tr.acc, tr.state
    t_start, steps_at_start = time.perf_counter(), st.step
    summary = dict(st.summary)
    if tr.evaluates and "eval/reward_before" not in summary:
        before = tr.evaluate()
        summary.update({f"{k}_before": v for k, v in before.items()})  # eval/reward_before, eval/accuracy_before, ...
        tr.writer.log(before, step=st.step)
        acc.print(f"eval before training: {brief(before)}")
    bar = tqdm(total=cfg.max_steps, initial=st.step, disable=not (cfg.progress and acc.is_main_process),
               desc="pg_lm", dynamic_ncols=True)
    tr.signal, saved = None, None  # saved: (step, folder) of this run's newest checkpoint
    with stop_on_signals(tr):
        while st.step < cfg.max_steps:
            signum, out_of_time = should_stop(tr)
            if signum:
                bar.close()
                interrupted(tr, signum, summary, _saved_now(saved, st.step))
            if out_of_time:
                acc.print(f"stopping at step {st.step}: --max-seconds {cfg.max_seconds} reached")
                break
            try:
                stats = tr.train_step()
            except EngineError as e:  # the sampler failed before this step changed anything: keep what is done
                path = _saved_now(saved, st.step) or save_checkpoint(tr, summary)
                raise EngineError(f"{e}; the run's state at step {st.step} is saved in {path} (--resume continues "
                                  "it)") from None
            verdict = _watch(tr, stats, summary)
            _after_step(tr, stats, bar, (time.perf_counter() - t_start) / (st.step - steps_at_start))
            if cfg.save_every and st.step % cfg.save_every == 0:
                saved = st.step, save_checkpoint(tr, summary)
            if verdict == "collapsed" and cfg.stop_on_collapse:
                acc.print(f"stopping at step {st.step}: --stop-on-collapse")
                break
    bar.close()
    return _finish(tr, summary, st.step - steps_at_start)


def _saved_now(saved: tuple | None, step: int):
    """The folder of the checkpoint this run saved at ``step`` (``saved``: its newest, (step, folder)), or None."""
    return saved[1] if saved and saved[0] == step else None


def _watch(tr, stats: dict, summary: dict) -> str | None:
    """The learning-signal monitor's verdict on this step (:mod:`.monitor`), printed and kept in
    ``summary`` (``learning``; a collapse's warning in ``warnings``) the step it is reached."""
    verdict = monitor.watch(tr.state, stats, tr.cfg.collapse_steps)
    if verdict is not None:
        line = monitor.message(verdict, stats, tr.state.step, tr.cfg.collapse_steps)
        tr.acc.print(line)
        summary["learning"] = verdict
        if verdict == "collapsed":
            summary.setdefault("warnings", []).append(line)
    return verdict


def _after_step(tr, stats: dict, bar, per_step: float) -> None:
    """Evaluate and log as the flags ask; move the progress bar (``per_step``: seconds a step of
    this run has taken, for the steps a time budget allows)."""
    cfg, st = tr.cfg, tr.state
    if tr.evaluates and cfg.eval_every and st.step % cfg.eval_every == 0:
        stats.update(tr.evaluate())
    if st.step % cfg.log_every == 0 or "eval/reward" in stats:
        tr.writer.log({**stats, "wall_s": st.elapsed()}, step=st.step)
    if cfg.max_seconds is not None:  # a time budget: show the steps it will allow, so the ETA is right
        left = max(cfg.max_seconds - st.elapsed(), 0.0)
        bar.total = min(cfg.max_steps, st.step + int(left / per_step) + 1)
    bar.update(1)
    bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", tok_s=f"{stats['perf/tokens_per_s']:.0f}")


def _finish(tr, summary: dict, steps_this_run: int) -> dict:
    """The final evaluation, the summary, the last checkpoint (``--save-model``) and the plot."""
    cfg, acc, st = tr.cfg, tr.acc, tr.state
    if tr.evaluates:
        after = tr.evaluate()
        summary.update({f"{k}_after": v for k, v in after.items() if k != "eval/reward"})
        summary["eval/reward_after"] = after["eval/reward"]
        tr.writer.log(after, step=st.step)
        acc.print(f"eval after training: {brief(after)} (reward before {summary['eval/reward_before']:.3f})")
        warning = truncation_warning(after, cfg.eval_tokens, "--eval-max-new-tokens") if tr.make_env is None else None
        if warning:  # the reward of a cut answer says little about what the policy learned
            summary.setdefault("warnings", []).append(warning)
            acc.print(warning)
    summary.update({"train/steps": st.step, "wall_s": st.elapsed(), "train/steps_this_run": steps_this_run,
                    "num_processes": acc.num_processes, "model": cfg.model})
    if cfg.save_model:
        save_checkpoint(tr, summary)
    tr.writer.write_json("summary.json", summary)
    rows = tr.writer.read_metrics() if acc.is_main_process else []
    evals = [(r["step"], r["eval/reward"]) for r in rows if r.get("eval/reward") is not None]
    tr.writer.plot("reward/mean", "reward.png", title="training reward", extra={"eval/reward (greedy, held-out)": evals})
    end(tr)
    return summary


def write_samples(tr, batch, adv) -> None:
    """Every ``--samples-every`` steps (and after the first): the step's completions to samples.jsonl,
    and their per-token credit to samples_tokens.jsonl (for ``pg-lm view``)."""
    cfg, step = tr.cfg, tr.state.step
    if step % cfg.samples_every and step != 1:
        return
    rows = [{"step": step, "prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in zip(batch.prompts, batch.completions, batch.scores)]
    for row, turns in zip(rows, batch.episodes or ()):  # an episode: its turns, each with its reward
        row["turns"] = turns
    tr.writer.samples(rows)
    if tr.writer.enabled:  # decoding is work: the writing process only
        tr.writer.samples(credit.token_rows(batch, adv, tr.tok, step, cfg.samples_per_prompt, cfg.kl_estimator),
                          name=credit.FILE)


def interrupted(tr, signum: int, summary: dict, path=None):
    """Save (unless ``path`` already holds this step), end, raise :class:`Interrupted`."""
    path = path or save_checkpoint(tr, summary)
    tr.writer.write_json("summary.json", {**summary, "train/steps": tr.state.step,
                                          "interrupted": signal.Signals(signum).name})
    end(tr)
    raise Interrupted(signum, tr.state.step, path)


def should_stop(tr) -> tuple[int, bool]:
    """(a signal caught on any process, or 0; whether ``--max-seconds`` is spent), agreed by all
    processes so that every one stops at the same step."""
    late = tr.cfg.max_seconds is not None and tr.state.elapsed() > tr.cfg.max_seconds
    flags = tr.coll.reduce(torch.tensor([tr.signal or 0, int(late)], device=tr.acc.device), "max")
    return int(flags[0]), bool(flags[1])


def end(tr) -> None:
    """Close the trackers and, with several processes, free the process group, so the process
    exits cleanly. ``destroy_process_group`` alone does not free it while DDP's reducer holds it:
    gloo's worker threads then live into interpreter shutdown, and one that drops the last
    reference to a just-finished collective's tensor needs the GIL there, which aborts the
    process (SIGABRT, "terminate called without an active exception"). So the DDP wrapper goes
    first (``tr.policy`` becomes the plain model); the group's destructor then waits for its
    workers. :func:`train` calls this at its end."""
    acc = tr.acc
    if tr.engine is not None:
        tr.engine.close()
    if acc.num_processes > 1:
        tr.policy = acc.unwrap_model(tr.policy)
        acc.free_memory()  # the accelerator's own references to the prepared model; collects garbage
    acc.end_training()
