"""ONE training step for language models: sample -> score -> estimate -> update.

REINFORCE-with-baseline and GAE/PPO differ only in ``estimate.advantages`` and in whether a value
head exists; every other job has a file of its own (rollout, loss, update, trpo, dynamic, episodes,
health, dist, loop, setup, checkpoint; an inference engine samples in ``engine``). Left out: sequence packing, remote reward
models, off-policy corrections for stale rollouts (only the sampler-learner mismatch of the same
weights is corrected: ``--sampler-correction``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch import Tensor

from pg_lm.core import explained_variance, kl_estimate, masked_mean, masked_whiten, zero_spread_groups

from . import dynamic, episodes, estimate, health, loop, trpo, update
from .config import LMConfig
from .data import check_dataset, step_rows
from .dist import Collective, sampling_lm
from .engine import make_engine
from .evaluate import evaluate
from .health import NonFiniteError, QUANTITIES  # noqa: F401  (the step's errors, importable from here)
from .loss import micro_loss
from .rewards import RewardModel, RewardSet
from .rollout import Rollout, split_greedy
from .sampling import fit_prompts, sample
from .setup import build


class Trainer:
    """Trains ``cfg.model`` on ``train_dataset`` (a ``datasets.Dataset`` with a ``prompt`` column;
    other columns reach the reward functions) with ``reward_fns``. Its parts (accelerator, tokenizer,
    policy, reference, optimizer, scheduler, writer, the CPU layer's sampling copy) come from
    :func:`~pg_lm.lm.setup.build`; what changes from step to step is ``self.state``, a
    :class:`~pg_lm.lm.checkpoint.TrainState`."""

    def __init__(self, cfg: LMConfig, reward_fns, train_dataset, eval_dataset=None, reward_weights=None, env=None):
        if env is not None and cfg.env is None:  # episodes of many turns: recorded, and checked by the config
            cfg = cfg.with_env(episodes.env_name(env))
        self.cfg, self.make_env = cfg, episodes.resolve_env(cfg, env)  # (then the env gives the rewards)
        # with an environment, reward functions (optional) add a final reward to each episode
        self.rewards = RewardSet(reward_fns, reward_weights, timeout=cfg.reward_timeout) \
            if reward_fns or not self.make_env else None
        for ds, what in ((train_dataset, "training"), (eval_dataset, "evaluation")):
            if ds is not None:
                check_dataset(ds, what)
                if self.rewards is not None:
                    self.rewards.check_columns(ds.column_names + (["episode"] if self.make_env else []), what)
        parts, self.state = build(cfg)  # (resumed when cfg.resume)
        self.acc, self.tok, self.policy, self.ref, self.params = parts.acc, parts.tok, parts.policy, parts.ref, parts.params
        self.opt, self.sched, self.writer = parts.opt, parts.sched, parts.writer
        self.cpu_layer, self.sampler, self.param_names = parts.cpu_layer, parts.sampler, parts.param_names
        self.coll, self.signal = Collective(self.acc), None  # signal: SIGINT / SIGTERM caught (loop.py)
        for fn in self.rewards.fns if self.rewards else ():  # a reward model scores its batches on the accelerator
            if isinstance(fn, RewardModel):
                fn.model.to(self.acc.device)
        self.delta = episodes.check_template(self.tok, cfg.model, cfg.system_prompt) if self.make_env else None
        # every prompt over --max-prompt-length found now, not at the step that draws it
        self.train_ds, self.eval_ds = self._fit(train_dataset, "training"), self._fit(eval_dataset, "evaluation")
        # --generator vllm: a server given the policy's weights (last: nothing after it can fail and leave it running)
        self.engine = make_engine(cfg, self.acc, self.acc.unwrap_model(self.policy).lm, self.tok, self.state.step)

    def _fit(self, dataset, what: str):  # (--long-prompts)
        if dataset is None:
            return None
        c = self.cfg
        dataset, note = fit_prompts(dataset, self.tok, c.chat_template, c.max_prompt_length, c.long_prompts, what,
                                    c.system_prompt)
        if note:
            self.acc.print(note)
        return dataset

    @property
    def step(self) -> int:  # training steps done
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def prompts(self, step: int, round: int = 0) -> tuple[list, dict]:
        """(this process's prompts for ``step``, their other columns): :func:`~pg_lm.lm.data.step_rows`."""
        idx = step_rows(len(self.train_ds), self.cfg.prompts_per_step, self.cfg.seed, step, self.acc.process_index,
                        self.acc.num_processes, round)
        rows = self.train_ds.select(idx)
        return rows["prompt"], {c: rows[c] for c in rows.column_names if c != "prompt"}

    # ------------------------------------------------------------------ forward passes
    def forward(self, batch: Rollout, grad: bool, model=None):
        """(log-probs (B, T), values (B, T) or None, entropy (B, T) or None) of ``batch``'s completion
        tokens under ``model`` (the policy by default)."""
        model = model or self.policy
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.attention)
        kw = dict(group_size=batch.group_size, temperature=self.cfg.temperature, with_entropy=grad,
                  entropy_grad=bool(self.cfg.entropy_coef))
        with nullcontext() if grad else torch.no_grad(), self.acc.autocast():
            # low precision: the sampling copy's weights are autocast's casts, already made (same values, same gradient)
            weights = self.sampler.linear_weights(self.param_names) if self.sampler and model is self.policy else {}
            if weights:
                return torch.func.functional_call(model, weights, args, kw, strict=False)
            return model(*args, **kw)

    def _ref_logp(self, batch: Rollout) -> Tensor | None:
        if self.state.kl_coef <= 0 and self.cfg.kl_target is None:
            return None
        if self.ref is not None:
            return self.forward(batch, grad=False, model=self.ref)[0]
        with self.acc.unwrap_model(self.policy).lm.disable_adapter():  # LoRA: the base is the reference
            return self.forward(batch, grad=False)[0]

    def sampling_lm(self):
        """(the causal LM to sample from, a function making the context to sample in): :func:`~pg_lm.lm.dist.sampling_lm`;
        with ``--generator vllm`` the engine, given the policy's weights first when it does not hold this step's."""
        lm, context = sampling_lm(self.acc, self.policy, self.sampler)
        if self.engine is None:
            return lm, context
        self.engine.prepare(self.acc.unwrap_model(self.policy).lm, self.state.step, self.acc.wait_for_everyone)
        return self.engine, nullcontext

    # ------------------------------------------------------------------ sample and score
    def _draw(self, prompts: list, cols: dict, lm, context) -> tuple[Rollout, dict]:
        """(G scored completions of each prompt, the per-function rewards (B,) each): ``rewards`` holds
        the dense task reward (B, T) with the overlong penalty, ``scores`` its sum (B,)."""
        cfg = self.cfg
        with context():
            batch = sample(lm, self.tok, prompts, cols, cfg.samples_per_prompt, cfg.max_new_tokens,
                           cfg.temperature, cfg.top_p, cfg.top_k, chat_template=cfg.chat_template,
                           max_prompt_length=cfg.max_prompt_length, cpu_layer=self.cpu_layer,
                           truncate_prompts=cfg.long_prompts == "truncate-left", system_prompt=cfg.system_prompt,
                           logprobs=True, greedy_extra=cfg.baseline == "remax")
        per_fn, dense = self.rewards.score(batch.prompts, batch.completions, batch.columns, batch.lengths.tolist(),
                                           batch.completion_ids, self.tok)
        dense = dense.to(batch.completion_mask.device)
        if cfg.overlong_penalty:
            last = (batch.lengths - 1).clamp(min=0)
            dense[batch.truncated, last[batch.truncated]] += cfg.overlong_penalty
        batch.rewards, batch.scores = dense, dense.sum(1)  # (B, T), (B,)
        if cfg.baseline == "remax":  # scored like the samples (same functions, penalty), then set apart: not trained on
            G = cfg.samples_per_prompt
            per_fn = {k: v.view(-1, G + 1)[:, :-1].reshape(-1) for k, v in per_fn.items()}
            batch, greedy = split_greedy(batch, G)
            batch.greedy_scores = greedy.scores.repeat_interleave(G)  # (B,)
        return batch, per_fn

    def rollout(self, step: int | None = None) -> tuple[Rollout, dict]:
        """Sample and score the batch of ``step`` (default: the step under way), with the learner's
        log-probs, values and KL-shaped rewards when needed. The reward and completion statistics are
        those of the first sampling round (the policy's own draws, with or without dynamic sampling)."""
        cfg, step = self.cfg, self.state.step if step is None else step
        lm, context = self.sampling_lm()
        t0 = time.perf_counter()
        self.policy.eval()
        if self.rewards is not None:  # what TRL's reward functions read as ``trainer_state`` (the run's progress)
            self.rewards.trainer_state = SimpleNamespace(global_step=step, max_steps=cfg.max_steps)
        if self.make_env is not None:
            batch, per_fn = episodes.step_episodes(self, step, lm, context)
        else:
            batch, per_fn = self._draw(*self.prompts(step), lm, context)
        stats = batch.stats(per_fn, cfg.pass_threshold)
        if cfg.samples_per_prompt > 1:
            zero = zero_spread_groups(batch.scores, cfg.samples_per_prompt)  # (groups,)
            stats["reward/zero_spread_frac"] = zero.float().mean()
            if cfg.dynamic_sampling:
                batch, more = dynamic.informative(batch, zero, lambda k: self._draw(*self.prompts(step, k), lm, context)[0],
                                                  cfg, self.coll, self.tok.pad_token_id, step, self.acc.print)
                stats.update(more, **{"reward/trained_mean": batch.scores.mean()})
        stats["perf/gen_s"] = time.perf_counter() - t0
        if self.engine is not None:
            stats["perf/sync_s"] = self.engine.sync_s  # the weights' way to the server before this rollout
        mask = batch.completion_mask
        batch.ref_logp = self._ref_logp(batch)
        if cfg.reuses_rollout or cfg.uses_value_head or batch.ref_logp is not None:
            batch.logp, batch.values, _ = self.forward(batch, grad=False)
        kl_coef = self.state.kl_coef if cfg.kl_in == "reward" else 0.0
        batch.rewards, kl = estimate.token_rewards(batch.rewards, mask, batch.logp, batch.ref_logp, kl_coef,
                                                   cfg.kl_estimator)
        if kl is None and batch.ref_logp is not None:
            kl = kl_estimate(batch.logp, batch.ref_logp, cfg.kl_estimator) * mask
        if kl is not None:
            stats["kl/ref"] = kl.sum(1).mean()  # per sequence
        return batch, stats

    # ------------------------------------------------------------------ estimate
    def advantages(self, batch: Rollout, estimator: str | None = None, baseline: str | None = None,
                   scale_rewards: bool | None = None, credit: str | None = None,
                   turn_baseline: str | None = None) -> tuple[Tensor, Tensor | None]:
        """(advantages (B, T), value targets (B, T) or None) of a scored rollout, as the config asks;
        ``estimator`` / ``baseline`` / ``scale_rewards`` / ``credit`` / ``turn_baseline`` given: as those
        flags would (pg_lm/lm/variance.py compares estimators on one rollout)."""
        cfg = self.cfg
        estimator = cfg.estimator if estimator is None else estimator
        baseline = cfg.baseline if baseline is None else baseline
        scale_rewards = cfg.scale_rewards if scale_rewards is None else scale_rewards
        credit = cfg.credit if credit is None else credit
        turn_baseline = cfg.turn_baseline if turn_baseline is None else turn_baseline
        greedy = batch.greedy_scores[::cfg.samples_per_prompt] if batch.greedy_scores is not None else None  # (B / G,)
        if batch.turn_end is not None:  # episodes of many turns: credit over turns (--credit)
            adv, returns = estimate.episode_advantages(
                credit, baseline, batch.rewards, batch.completion_mask, batch.turn_end, batch.values, batch.truncated,
                cfg.samples_per_prompt, cfg.gamma, cfg.gae_lambda, cfg.turn_gamma, turn_baseline, scale_rewards)
        else:
            adv, returns = estimate.advantages(estimator, baseline, batch.rewards, batch.completion_mask, batch.values,
                                               cfg.samples_per_prompt, cfg.gamma, cfg.gae_lambda, scale_rewards,
                                               greedy_scores=greedy)
        if cfg.whiten_advantages:  # over the global batch: every process's tokens (REINFORCE++)
            adv = masked_whiten(adv, batch.completion_mask, reduce=self.coll.whiten_reduce())
        return adv, returns

    def update(self, batch: Rollout, adv: Tensor, returns: Tensor | None) -> tuple[dict, str | None]:
        """One update of the policy on a scored ``batch`` (as ``--update`` says): (its statistics, the
        first non-finite quantity that made it skip an optimizer step, or None)."""
        return (trpo.update if self.cfg.update == "trpo" else update.update)(self, batch, adv, returns)

    def rollout_loss(self, batch: Rollout, adv: Tensor, returns: Tensor | None = None) -> Tensor:
        """The loss the update minimises, on the whole of ``batch`` as one micro-batch (its own token and
        sequence counts as the denominators): its gradient is that of one optimizer step of a
        one-process run with one minibatch, before clipping. ``returns`` None leaves out the value loss."""
        counts = (float(batch.completion_mask.sum()), float(len(adv)))
        return micro_loss(self.cfg, self.state.kl_coef, batch, self.forward(batch, grad=True), adv, returns, counts,
                          counts)[0]

    # ------------------------------------------------------------------ the step
    def train_step(self) -> dict:
        """Sample, score, estimate, update: one step; returns its metrics (averaged over processes)."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        lr = self.sched.get_last_lr()[0]  # this step's learning rate
        batch, stats = self.rollout()
        adv, returns = self.advantages(batch)
        t1 = time.perf_counter()
        bad = self.coll.first(QUANTITIES, health.nonfinite(
            {"reward": batch.rewards, "sampler log-prob": batch.sampler_logp, "advantage": adv, "log-prob": batch.logp},
            batch.completion_mask))
        if bad is None:  # a non-finite rollout is not trained on at all
            more, bad = self.update(batch, adv, returns)
            stats.update(more)
        health.count(st, bad, cfg.max_bad_steps, self.acc.print)
        stats["health/skipped_steps"] = st.skipped_steps
        if returns is not None and batch.values is not None:
            stats["value/explained_var"] = float(explained_variance(batch.values, returns, batch.completion_mask))
        stats = self.coll.scalars(stats)
        if "kl/ref" in stats and cfg.kl_target is not None:  # the adaptive KL controller (Ziegler et al. 2019)
            st.kl_coef = estimate.adaptive_kl_coef(st.kl_coef, stats["kl/ref"], cfg.kl_target, cfg.kl_horizon,
                                                   cfg.prompts_per_step * cfg.samples_per_prompt * self.coll.world)
        tokens = self.coll.sum(batch.completion_mask.sum())
        step_s = time.perf_counter() - t0
        stats.update({"kl/coef": st.kl_coef, "lr": lr, "perf/step_s": step_s,
                      "perf/train_s": time.perf_counter() - t1, "perf/tokens_per_s": tokens / step_s,
                      "advantage/mean": float(masked_mean(adv, batch.completion_mask))})
        st.step += 1
        self.sched.step()  # the next step's learning rate, from the progress made
        loop.write_samples(self, batch, adv)
        return stats

    # ------------------------------------------------------------------ the run
    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates: held-out prompts, or an environment's held-out seeds (--eval-size > 0)."""
        return self.eval_ds is not None or (self.make_env is not None and self.cfg.eval_size != 0)

    def evaluate(self) -> dict:
        return evaluate(self)

    def train(self) -> dict:
        """Run to ``max_steps`` (or ``max_seconds``): :func:`pg_lm.lm.loop.train`."""
        return loop.train(self)

    def end(self) -> None:
        """Close the trackers and free the process group (:func:`pg_lm.lm.loop.end`)."""
        loop.end(self)
