"""Evaluation on held-out prompts, one code path for the trainer (``--eval-every``, before and after
training) and ``pg-lm eval``: greedy completions give the mean total reward, accuracy (the fraction
with total reward >= ``pass_threshold``), mean completion length and the fraction cut at the token
limit; with ``eval_samples`` n > 0, n sampled completions per prompt give pass@k (the unbiased
estimator of Chen et al. 2021, :func:`pg_lm.core.pass_at_k`). An environment is evaluated the same
way on held-out seeds, one episode per seed in place of one completion per prompt
(:func:`evaluate_episodes`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pg_lm.core import pass_at_k

from . import episodes as ep
from .sampling import sample

# an evaluation that cuts more than this fraction of its greedy completions at the token limit says so
TRUNCATION_WARNING = 0.1


def metric_keys(rewards, pass_ks) -> list[str]:
    """The evaluation's metric names, the same on every process and in every call."""
    per_fn = [f"eval/{name}" for name in rewards.names if name != "reward"]  # "reward" is the total
    return ["eval/reward", *per_fn, "eval/accuracy", "eval/length", "eval/truncated_frac",
            *[f"eval/pass@{k}" for k in pass_ks]]


@torch.no_grad()
def evaluate_prompts(lm, tok, rewards, dataset, cfg, max_new_tokens: int, *, rank: int = 0, world: int = 1,
                     reduce=None, context=nullcontext, cpu_layer: bool = False, samples: list | None = None) -> dict:
    """Metrics over the first ``cfg.eval_size`` rows of ``dataset`` (all when None), this process
    taking rows ``rank::world``; ``reduce`` sums a tensor over processes. ``cfg`` is a
    :class:`~pg_lm.lm.config.PromptConfig`. ``samples``: a list that receives one row per completion."""
    n = len(dataset) if cfg.eval_size is None else min(cfg.eval_size, len(dataset))
    rows = dataset.select(range(rank, n, world))
    keys = metric_keys(rewards, cfg.pass_ks)
    sums = dict.fromkeys(keys, 0.0)
    opts = dict(chat_template=cfg.chat_template, max_prompt_length=cfg.max_prompt_length, cpu_layer=cpu_layer,
                truncate_prompts=cfg.long_prompts == "truncate-left", system_prompt=cfg.system_prompt)
    # entered on every process, even one with no rows: under FSDP2 it gathers the weights
    with context():
        for i in range(0, len(rows), cfg.eval_batch_size):
            chunk = rows.select(range(i, min(i + cfg.eval_batch_size, len(rows))))
            cols = {c: chunk[c] for c in chunk.column_names if c != "prompt"}
            batch = sample(lm, tok, chunk["prompt"], cols, 1, max_new_tokens, greedy=True, **opts)
            total = _score(rewards, batch, tok, samples, "greedy", sums)
            sums["eval/reward"] += float(total.sum())
            sums["eval/accuracy"] += float((total >= cfg.pass_threshold).sum())
            sums["eval/length"] += float(batch.lengths.sum())
            sums["eval/truncated_frac"] += float(batch.truncated.sum())
            if cfg.pass_ks:
                G = cfg.eval_samples
                batch = sample(lm, tok, chunk["prompt"], cols, G, max_new_tokens, cfg.temperature, cfg.top_p,
                               cfg.top_k, **opts)
                correct = (_score(rewards, batch, tok, samples, "sampled") >= cfg.pass_threshold).view(-1, G)
                n_rows = torch.full((correct.shape[0],), G, device=correct.device)
                for k in cfg.pass_ks:
                    sums[f"eval/pass@{k}"] += float(pass_at_k(n_rows, correct.sum(1), k).sum())
    vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)  # host: Python sums; reduce moves them
    if reduce is not None:
        vals = reduce(vals)
    return {k: float(v) / max(n, 1) for k, v in zip(keys, vals.tolist())}


def _score(rewards, batch, tok, samples, kind: str, sums: dict | None = None):
    """(B,) total reward of each completion of ``batch``; per-function sums into ``sums``, rows into ``samples``."""
    lengths = batch.lengths.tolist()
    per_fn, dense = rewards.score(batch.prompts, batch.completions, batch.columns, lengths, batch.completion_ids, tok)
    total = dense.sum(1)  # (B,)
    if sums is not None:
        for name in rewards.names:
            if name != "reward":
                sums[f"eval/{name}"] += float(per_fn[name].sum())
    if samples is not None:
        samples += [{"kind": kind, "prompt": p, "completion": c, "reward": float(r), "length": n, "truncated": bool(t)}
                    for p, c, r, n, t in zip(batch.prompts, batch.completions, total.tolist(), lengths,
                                             batch.truncated.tolist())]
    return total


def truncation_warning(metrics: dict, max_new_tokens: int, flag: str) -> str | None:
    """A warning when the evaluation cut more than :data:`TRUNCATION_WARNING` of its greedy completions."""
    frac = metrics.get("eval/truncated_frac", 0.0)
    if frac <= TRUNCATION_WARNING:
        return None
    return (f"warning: the evaluation cut {frac:.0%} of its completions at {flag} {max_new_tokens} tokens; their "
            f"reward is that of an unfinished answer (raise {flag})")


@torch.no_grad()
def evaluate_episodes(lm, tok, make_env, delta, cfg, max_new_tokens: int, *, rank: int = 0, world: int = 1,
                      reduce=None, context=nullcontext, cpu_layer: bool = False, rewards=None,
                      samples: list | None = None) -> dict:
    """Metrics over ``cfg.eval_size`` [100] held-out seeds (``EVAL_SEED`` + k, this process taking
    ``rank::world``), one greedy episode each (``max_new_tokens`` per turn): the mean return
    (``eval/reward``, with the reward functions' final reward when ``rewards``), success (the share
    whose return reaches ``pass_threshold``: ``eval/accuracy``), turns, action tokens, the share cut;
    with ``eval_samples`` n > 0, n sampled episodes per seed give pass@k. ``samples`` receives one
    row per episode, its turns included."""
    n = cfg.eval_size if cfg.eval_size is not None else 100
    seeds = [ep.EVAL_SEED + k for k in range(rank, n, world)]
    keys = ["eval/reward", "eval/accuracy", "eval/turns", "eval/length", "eval/truncated_frac",
            *[f"eval/pass@{k}" for k in cfg.pass_ks]]
    sums = dict.fromkeys(keys, 0.0)
    opts = dict(max_turns=cfg.max_turns, max_new_tokens=max_new_tokens, max_episode_tokens=cfg.max_episode_tokens,
                chat_template=cfg.chat_template, cpu_layer=cpu_layer, env_timeout=cfg.env_timeout,
                env_error_reward=cfg.env_error_reward)

    def play(chunk, kind, G=1, **sampling):
        b = ep.run_episodes(lm, tok, make_env, chunk, [None] * len(chunk), delta, group_size=G, **opts, **sampling)
        if rewards is not None:
            ep.final_rewards(rewards, b, [None] * len(chunk), tok)
        if samples is not None:
            samples.extend({"kind": kind, "seed": s, "prompt": p, "reward": float(r), "turns": t}
                           for s, p, r, t in zip([s for s in chunk for _ in range(G)], b.prompts, b.scores, b.episodes))
        return b

    with context():  # entered on every process, even one with no seeds: under FSDP2 it gathers the weights
        for i in range(0, len(seeds), cfg.eval_batch_size):
            chunk = seeds[i : i + cfg.eval_batch_size]
            b = play(chunk, "greedy", greedy=True)
            for key, v in (("eval/reward", b.scores), ("eval/accuracy", b.scores >= cfg.pass_threshold),
                           ("eval/turns", b.turn_end), ("eval/length", b.completion_mask),
                           ("eval/truncated_frac", b.truncated)):
                sums[key] += float(v.float().sum())
            if cfg.pass_ks:
                G = cfg.eval_samples
                b = play(chunk, "sampled", G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
                correct = (b.scores >= cfg.pass_threshold).view(-1, G)
                for k in cfg.pass_ks:
                    sums[f"eval/pass@{k}"] += float(pass_at_k(torch.full_like(correct[:, 0], G, dtype=torch.long),
                                                              correct.sum(1), k).sum())
    vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)  # host: Python sums; reduce moves them
    if reduce is not None:
        vals = reduce(vals)
    return {k: float(v) / max(n, 1) for k, v in zip(keys, vals.tolist())}


def evaluate(trainer) -> dict:
    """The trainer's held-out evaluation (:func:`evaluate_prompts` on its evaluation prompts, or
    :func:`evaluate_episodes` on its environment) on its policy, split across processes."""
    cfg, acc = trainer.cfg, trainer.acc
    lm, context = trainer.sampling_lm()
    trainer.policy.eval()
    reduce = (lambda t: acc.reduce(t.to(acc.device), "sum").cpu()) if acc.num_processes > 1 else None
    where = dict(rank=acc.process_index, world=acc.num_processes, reduce=reduce, context=context,
                 cpu_layer=trainer.cpu_layer)
    if trainer.make_env is not None:
        return evaluate_episodes(lm, trainer.tok, trainer.make_env, trainer.delta, cfg, cfg.eval_tokens,
                                 rewards=trainer.rewards, **where)
    return evaluate_prompts(lm, trainer.tok, trainer.rewards, trainer.eval_ds, cfg, cfg.eval_tokens, **where)
