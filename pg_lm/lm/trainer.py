"""ONE training loop for language models: sample -> score -> estimate -> update.

REINFORCE-with-baseline and GAE/PPO differ only in ``estimate.advantages`` and in
whether a value head exists. Accelerate does placement, mixed precision and
multi-process; the loss is normalised by *global* token counts so that the gradient
does not depend on how a batch is split into micro-batches or processes.

Deliberately left out: sequence packing, vLLM-style inference engines, reward
models running on other processes, off-policy corrections for stale rollouts (only the
sampler-learner mismatch of the same weights is corrected: ``--sampler-correction``).
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from pg_lm.core import (
    aggregate,
    clip_fractions,
    kl_estimate,
    log_ratio,
    masked_mean,
    masked_whiten,
    policy_loss,
    sampler_is_weights,
    value_loss,
    zero_spread_groups,
)
from pg_lm.run.signals import Interrupted, stop_on_signals

from . import credit, estimate, trpo
from .checkpoint import save_checkpoint
from .config import LMConfig
from .data import check_dataset
from .evaluate import evaluate, truncation_warning
from .peers import PeerWatch
from .rewards import RewardModel, RewardSet
from .sampling import Rollout, concat_rollouts, fit_prompts, sample, split_greedy


# the quantities checked for NaN / inf each step, in the order they are computed
QUANTITIES = ("reward", "sampler log-prob", "advantage", "log-prob", "IS weight", "loss", "gradient")


class NonFiniteError(RuntimeError):
    """``--max-bad-steps`` updates in a row were skipped for a non-finite value (named)."""


def _nonfinite(named: dict, mask: Tensor) -> str | None:
    """The name of the first (B, T) tensor in ``named`` with a NaN or inf on a real token, or None."""
    m = mask.bool()
    return next((k for k, x in named.items() if x is not None and not bool(torch.isfinite(x[m]).all())), None)


def _brief(metrics: dict) -> str:
    """``reward 0.500, accuracy 0.250, pass@4 0.750, ...`` for the console."""
    show = [k for k in metrics if k in ("eval/reward", "eval/accuracy", "eval/truncated_frac") or "pass@" in k]
    return ", ".join(f"{k[5:]} {metrics[k]:.3f}" for k in show)


def _whole_groups(rows: Tensor, G: int) -> bool:
    """Whether ``rows`` is a run of whole groups of G consecutive rows, each in order."""
    if G == 1 or len(rows) % G:
        return G == 1
    g = rows.view(-1, G)
    return bool((g[:, 0] % G == 0).all() and (g == g[:, :1] + torch.arange(G, device=rows.device)).all())


@contextmanager
def full_weights(model):
    """Every FSDP2-sharded module of ``model`` with its whole weights for the duration: all-gathered
    once and kept through every forward (no re-sharding after each), resharded on leaving. Sampling
    then runs the model's forward as on one device, with no collective per decode step, so the
    processes may decode different numbers of steps. Without FSDP2, nothing to do."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)] if FSDPModule else []
    if not sharded:
        yield
        return
    # whether each module reshards after its forward (FSDP2 keeps no public getter for it)
    before = [any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
              for m in sharded]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(sharded, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


class Trainer:
    """Trains ``cfg.model`` on ``train_dataset`` (a ``datasets.Dataset`` with a ``prompt``
    column; other columns reach the reward functions) with ``reward_fns``."""

    def __init__(self, cfg: LMConfig, reward_fns, train_dataset, eval_dataset=None, reward_weights=None):
        from .setup import build

        self.cfg = cfg
        self.rewards = RewardSet(reward_fns, reward_weights, timeout=cfg.reward_timeout)
        for ds, what in ((train_dataset, "training"), (eval_dataset, "evaluation")):
            if ds is None:
                continue
            check_dataset(ds, what)
            self.rewards.check_columns(ds.column_names, what)
        self.train_ds, self.eval_ds = train_dataset, eval_dataset
        self.kl_coef = cfg.kl_coef
        self.step = 0
        self.bad_in_row = 0  # updates skipped in a row for a non-finite value (--max-bad-steps)
        self._bad = None  # the first non-finite quantity of the optimizer step under way (this process)
        build(self)  # accelerator, policy, reference, optimizer, writer (see setup.py)
        sharded = str(self.acc.distributed_type).split(".")[-1]
        if cfg.update == "trpo" and sharded in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(f"--update trpo needs every process to hold the whole weights (DDP or one process); "
                             f"this launch shards them ({sharded})")
        if cfg.update == "trpo":  # without a value head AdamW never steps; the schedule still counts the steps
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
        for fn in self.rewards.fns:  # a reward model scores its batches on the accelerator
            if isinstance(fn, RewardModel):
                fn.model.to(self.acc.device)
        self.train_ds, self.eval_ds = self._fit(train_dataset, "training"), self._fit(eval_dataset, "evaluation")

    def _fit(self, dataset, what: str):
        """``dataset`` after ``--long-prompts``: every prompt over the limit is found now, not at
        the step that draws it."""
        if dataset is None:
            return None
        cfg = self.cfg
        dataset, note = fit_prompts(dataset, self.tok, cfg.chat_template, cfg.max_prompt_length, cfg.long_prompts, what,
                                    cfg.system_prompt)
        if note:
            self.acc.print(note)
        return dataset

    def progress(self) -> float:
        """How far the run is, 0..1: steps over ``max_steps``, or time over ``max_seconds`` if further."""
        p = self.step / self.cfg.max_steps
        if self.cfg.max_seconds and hasattr(self, "elapsed"):
            p = max(p, self.elapsed() / self.cfg.max_seconds)
        return min(p, 1.0)

    # ------------------------------------------------------------------ data
    def _prompts(self, step: int, round: int = 0) -> tuple[list[str], dict]:
        """This process's prompts for ``step``: a seeded permutation per epoch, sliced by rank.
        ``round`` k > 0 (dynamic sampling's extra rounds): a permutation seeded by (seed, step, k),
        sliced by rank; a function of the step like the rest, so a resumed run draws the same."""
        n, per = len(self.train_ds), self.cfg.prompts_per_step
        world, rank = self.acc.num_processes, self.acc.process_index
        if round:
            g = torch.Generator().manual_seed((1 << 40) + (self.cfg.seed * 1_000_003 + step) * 1009 + round)
            perm = torch.randperm(n, generator=g)  # host: read back as ints, the same on every process
            idx = [int(perm[(rank * per + k) % n]) for k in range(per)]
        else:
            idx, start = [], step * per * world + rank * per
            for k in range(start, start + per):
                epoch, pos = divmod(k, n)
                g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
                perm = torch.randperm(n, generator=g)  # host: read back as ints, the same on every process
                idx.append(int(perm[pos]))
        rows = self.train_ds.select(idx)
        cols = {c: rows[c] for c in rows.column_names if c != "prompt"}
        return rows["prompt"], cols

    # ------------------------------------------------------------------ rollout
    def _forward(self, batch: Rollout, grad: bool, model=None):
        model = model or self.policy
        ctx = nullcontext() if grad else torch.no_grad()
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        kw = dict(group_size=batch.group_size, temperature=self.cfg.temperature, with_entropy=grad,
                  entropy_grad=bool(self.cfg.entropy_coef))
        with ctx, self.acc.autocast():
            # low precision: the sampling copy's weights are autocast's casts, already made (same values, same gradient)
            weights = self.sampler.linear_weights(self._param_names) if self.sampler and model is self.policy else {}
            if weights:
                return torch.func.functional_call(model, weights, args, kw, strict=False)
            return model(*args, **kw)

    def _ref_logp(self, batch: Rollout) -> Tensor | None:
        if self.kl_coef <= 0 and self.cfg.kl_target is None:
            return None
        if self.ref is not None:
            return self._forward(batch, grad=False, model=self.ref)[0]
        with self.acc.unwrap_model(self.policy).lm.disable_adapter():  # LoRA: the base is the reference
            return self._forward(batch, grad=False)[0]

    def sampling_lm(self):
        """(the causal LM to sample from, a function making the context to sample in): under the CPU
        layer in bf16/fp16 its sampling copy, with no autocast; else the policy's own LM under
        autocast, with its whole weights (:func:`full_weights`, for FSDP2). A function, not a
        context: ``Accelerator.autocast()`` is a generator context that can be entered only once."""
        if self.sampler is not None:
            return self.sampler.lm, nullcontext

        @contextmanager
        def context():
            with full_weights(self.policy), self.acc.autocast():
                yield

        return self.acc.unwrap_model(self.policy).lm, context

    def _draw(self, prompts: list[str], cols: dict, lm, context) -> tuple[Rollout, dict]:
        """(G scored completions of each prompt, the per-function rewards (B,) each): ``rewards`` holds
        the dense task reward (B, T) with the overlong penalty, ``scores`` its sum (B,), ``sampler_logp``
        the sampler's log-probs."""
        cfg = self.cfg
        with context():
            batch = sample(lm, self.tok, prompts, cols, cfg.samples_per_prompt, cfg.max_new_tokens,
                           cfg.temperature, cfg.top_p, cfg.top_k, chat_template=cfg.chat_template,
                           max_prompt_length=cfg.max_prompt_length, cpu_layer=self.cpu_layer,
                           truncate_prompts=cfg.long_prompts == "truncate-left", system_prompt=cfg.system_prompt,
                           logprobs=True, greedy_extra=cfg.baseline == "remax")
        mask = batch.completion_mask
        per_fn, dense = self.rewards.score(batch.prompts, batch.completions, batch.columns, batch.lengths.tolist(),
                                           batch.completion_ids, self.tok)
        dense = dense.to(mask.device)
        if cfg.overlong_penalty:
            last = (batch.lengths - 1).clamp(min=0)
            dense[batch.truncated, last[batch.truncated]] += cfg.overlong_penalty
        batch.rewards, batch.scores = dense, dense.sum(1)  # (B, T), (B,)
        if cfg.baseline == "remax":  # scored like the samples (same functions, penalty), then set apart: not trained on
            per = cfg.samples_per_prompt + 1
            per_fn = {k: v.view(-1, per)[:, :-1].reshape(-1) for k, v in per_fn.items()}
            batch, greedy = split_greedy(batch, cfg.samples_per_prompt)
            batch.greedy_scores = greedy.scores.repeat_interleave(cfg.samples_per_prompt)  # (B,)
        return batch, per_fn

    def _informative(self, first: Rollout, zero: Tensor, lm, context) -> tuple[Rollout, dict]:
        """DAPO's dynamic sampling (Yu et al. 2025): ``first``'s groups with a reward spread, then those
        of extra rounds (prompts of :meth:`_prompts` round 1, 2, ...), up to ``prompts_per_step``
        groups, in at most ``max_sampling_rounds`` extra rounds. Every process samples every round
        (sampling may be collective, FSDP2) until all are full. Still short then: a warning, and the
        batch is filled up with ``first``'s zero-spread groups, whose advantages are 0 under a group
        baseline: the step trains on the informative groups it has."""
        cfg, acc, G, need = self.cfg, self.acc, self.cfg.samples_per_prompt, self.cfg.prompts_per_step
        parts, keep, rounds = [first], [~zero], 0  # keep: (groups,) bool per part
        while True:
            short = need - sum(int(k.sum()) for k in keep)
            if acc.num_processes > 1:
                short = int(acc.reduce(torch.tensor([short], device=acc.device), "max"))
            if short <= 0 or rounds == cfg.max_sampling_rounds:
                break
            rounds += 1
            part, _ = self._draw(*self._prompts(self.step, rounds), lm, context)
            parts.append(part)
            keep.append(~zero_spread_groups(part.scores, G))
        chosen = [(i, g) for i, k in enumerate(keep) for g in k.nonzero().flatten().tolist()][:need]
        filler = need - len(chosen)
        chosen += [(0, g) for g in zero.nonzero().flatten().tolist()][:filler]
        if short > 0:
            acc.print(f"step {self.step + 1}: dynamic sampling is {short} informative group(s) short after "
                      f"--max-sampling-rounds {cfg.max_sampling_rounds}; the batch is filled up with zero-spread groups")
        picked = []
        for i, part in enumerate(parts):
            groups = sorted(g for j, g in chosen if j == i)
            if groups:
                rows = torch.tensor([g * G + k for g in groups for k in range(G)], device=part.prompt_ids.device)
                picked.append(part.select(rows, group_size=G))
        return concat_rollouts(picked, self.tok.pad_token_id), {
            "sampling/rounds": rounds, "sampling/cap_reached": float(short > 0), "sampling/filler_frac": filler / need}

    def rollout(self) -> tuple[Rollout, dict]:
        """Sample and score this step's batch, with the learner's log-probs and values when needed.
        The reward and completion statistics are those of the first sampling round (the policy's own
        draws, with or without dynamic sampling)."""
        cfg = self.cfg
        lm, context = self.sampling_lm()
        t0 = time.perf_counter()
        self.policy.eval()
        batch, per_fn = self._draw(*self._prompts(self.step), lm, context)
        lengths = batch.completion_mask.sum(1).float()  # (B,)
        stats = {"reward/mean": batch.scores.mean(), "reward/std": batch.scores.std() if len(batch.scores) > 1 else 0.0,
                 **{f"reward/{k}": v.mean() for k, v in per_fn.items()},
                 "completion/length": lengths.mean(), "completion/length_max": lengths.max(),
                 "completion/truncated_frac": batch.truncated.float().mean()}
        if batch.greedy_scores is not None:  # ReMax's baseline: the greedy completions' mean reward
            stats["reward/greedy"] = batch.greedy_scores.mean()
        if cfg.samples_per_prompt > 1:
            zero = zero_spread_groups(batch.scores, cfg.samples_per_prompt)  # (groups,)
            stats["reward/zero_spread_frac"] = zero.float().mean()
            if cfg.dynamic_sampling:
                batch, more = self._informative(batch, zero, lm, context)
                stats.update(more)
                stats["reward/trained_mean"] = batch.scores.mean()
        stats["perf/gen_s"] = time.perf_counter() - t0
        mask, dense = batch.completion_mask, batch.rewards
        batch.ref_logp = self._ref_logp(batch)
        if cfg.reuses_rollout or cfg.uses_value_head or batch.ref_logp is not None:
            batch.logp, batch.values, _ = self._forward(batch, grad=False)
        rewards, kl = estimate.token_rewards(dense, mask, batch.logp, batch.ref_logp,
                                             self.kl_coef if cfg.kl_in == "reward" else 0.0, cfg.kl_estimator)
        if kl is None and batch.ref_logp is not None:
            kl = kl_estimate(batch.logp, batch.ref_logp, cfg.kl_estimator) * mask
        batch.rewards = rewards
        if kl is not None:
            stats["kl/ref"] = kl.sum(1).mean()  # per sequence
        return batch, stats

    # ------------------------------------------------------------------ update
    def _micro_loss(self, mb: Rollout, adv: Tensor, returns: Tensor | None, denoms: tuple, stat_denoms: tuple):
        """Loss of one micro-batch, normalised by the *global* ``denoms`` = (tokens, sequences);
        diagnostics use ``stat_denoms``, the counts of the rows actually trained."""
        cfg = self.cfg
        logp, values, entropy = self._forward(mb, grad=True)
        mask = mb.completion_mask
        self._bad = self._bad or _nonfinite({"log-prob": logp.detach()}, mask)
        old = mb.logp if mb.logp is not None else logp.detach()

        def agg(x, d=denoms):
            return aggregate(x, mask, cfg.loss_agg, num_tokens=d[0], num_seqs=d[1], norm_len=cfg.max_new_tokens)

        pg, clipped = policy_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, cfg.ratio_level, mask)
        ratio = torch.exp(log_ratio(logp.detach(), old, mask, cfg.ratio_level))  # (B, T)
        low, high, dual = clip_fractions(ratio, adv, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c)
        parts = {"policy/clip_frac": agg(clipped, stat_denoms), "policy/clip_frac_low": agg(low, stat_denoms),
                 "policy/clip_frac_high": agg(high, stat_denoms), "policy/entropy": agg(entropy.detach(), stat_denoms),
                 "policy/entropy_sampled": agg(-old, stat_denoms),  # -log π_old of the drawn tokens: entropy's estimate
                 "policy/approx_kl": agg(0.5 * (logp.detach() - old) ** 2, stat_denoms)}
        if cfg.clip_ratio_c is not None:
            parts["policy/clip_frac_dual"] = agg(dual, stat_denoms)
        if mb.sampler_logp is not None:  # the learner's π_old against the sampler's numbers for the same tokens
            w, capped = sampler_is_weights(old, mb.sampler_logp, mask, cfg.sampler_correction, cfg.sampler_is_cap,
                                           cfg.sampler_is_level)  # (B, T) each
            self._bad = self._bad or _nonfinite({"IS weight": w}, mask)
            if cfg.sampler_correction != "none":
                pg = pg * w
                parts.update({"sampler/is_weight": agg(w, stat_denoms), "sampler/is_capped_frac": agg(capped, stat_denoms)})
            gap = torch.where(mask.bool(), old - mb.sampler_logp, 0.0)  # (B, T)
            parts.update({"sampler/logp_gap": agg(gap.abs(), stat_denoms), "sampler/logp_gap_max": gap.abs().max(),
                          "sampler/kl": agg(kl_estimate(mb.sampler_logp, old, "k3"), stat_denoms)})
        loss = agg(pg)
        parts["loss/policy"] = loss.detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * agg(entropy)
        if values is not None and returns is not None:
            old_v = mb.values if mb.values is not None else values.detach()
            vl = agg(value_loss(values, old_v, returns, cfg.value_clip))
            loss = loss + cfg.vf_coef * vl
            parts["loss/value"] = vl.detach()
        if cfg.kl_in == "loss" and mb.ref_logp is not None and self.kl_coef > 0:
            kl = agg(kl_estimate(logp, mb.ref_logp, cfg.kl_estimator))
            loss = loss + self.kl_coef * kl
            parts["loss/kl"] = kl.detach()
        if not bool(torch.isfinite(loss)):
            self._bad = self._bad or "loss"
        return loss, parts

    def rollout_loss(self, batch: Rollout, adv: Tensor, returns: Tensor | None = None) -> Tensor:
        """The loss :meth:`update` minimises, on the whole of ``batch`` as one micro-batch (its own
        token and sequence counts as the denominators): its gradient is that of one optimizer step of
        a one-process run with one minibatch, before clipping. ``returns`` None leaves out the value loss."""
        counts = (float(batch.completion_mask.sum()), float(len(adv)))
        return self._micro_loss(batch, adv, returns, counts, counts)[0]

    @property
    def _zero_rows_are_inert(self) -> bool:
        """Whether a row whose advantage is 0 on every token adds exactly nothing to the gradient:
        true when the loss is only the policy-gradient term (no value loss, entropy bonus or KL in the loss)."""
        cfg = self.cfg
        return not cfg.uses_value_head and not cfg.entropy_coef and not (cfg.kl_in == "loss" and self.kl_coef > 0)

    def _rows_to_train(self, rows: Tensor, adv: Tensor) -> Tensor:
        """``rows`` minus those with zero advantage everywhere, when they are inert (same gradient, less work).

        Every process must run the same number of micro-batches (DDP all-reduces in each
        backward), so each keeps the largest count over processes, topping up with inert rows.
        """
        if not self.cfg.skip_zero_advantage or not self._zero_rows_are_inert:
            return rows
        live = adv[rows].abs().amax(1) > 0  # (len(rows),)
        n = int(live.sum())
        if self.acc.num_processes > 1:
            n = int(self.acc.gather(torch.tensor([n], device=self.acc.device)).max())
        order = torch.cat([rows[live], rows[~live]])  # live rows first, in their original order
        return order[:n].sort().values

    def update(self, batch: Rollout, adv: Tensor, returns: Tensor | None) -> dict:
        """ppo_epochs x num_minibatches optimizer steps, each accumulated over micro-batches.

        Rows whose advantage is zero on every token (e.g. a group whose samples all got
        the same reward, under a group baseline) are left out of the forward/backward when
        they cannot change the gradient; the optimizer still steps, and denominators still
        count them, so the update is the one the full batch would give.
        """
        cfg, acc = self.cfg, self.acc
        if cfg.update == "trpo":  # one constrained natural-gradient step instead (docs/trpo.md)
            return trpo.update(self, batch, adv, returns)
        B = adv.shape[0]
        mb_rows = B // cfg.num_minibatches
        micro = cfg.micro_batch_size or mb_rows
        G = batch.group_size
        totals: dict[str, float] = {}
        trained, skipped = 0, None
        self.policy.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, device=adv.device) if cfg.num_minibatches > 1 else torch.arange(B, device=adv.device)
            for m in range(cfg.num_minibatches):
                rows = order[m * mb_rows : (m + 1) * mb_rows]
                # global denominators: identical loss whatever the micro-batch / process split
                n_tok = float(acc.reduce(batch.completion_mask[rows].sum().reshape(1), "sum"))
                n_seq = float(len(rows) * acc.num_processes)
                kept = self._rows_to_train(rows, adv)  # as many on every process, so all take the same branch
                stat_denoms = (n_tok, n_seq) if len(kept) == len(rows) else (
                    float(acc.reduce(batch.completion_mask[kept].sum().reshape(1), "sum")),
                    float(len(kept) * acc.num_processes))
                rows = kept
                trained += len(rows)
                self._bad = None
                # prompts are shared across a group only when micro-batches are whole groups in order
                share = G if micro % G == 0 and _whole_groups(rows, G) else 1
                chunks = rows.split(micro) if len(rows) else ()
                for i, chunk in enumerate(chunks):
                    mb = batch.select(chunk.to(batch.prompt_ids.device), group_size=share)
                    T = max(int(mb.completion_mask.sum(1).max()), 1)  # trim padding columns
                    mb.completion_ids, mb.completion_mask = mb.completion_ids[:, :T], mb.completion_mask[:, :T]
                    for name in ("logp", "ref_logp", "values", "sampler_logp"):
                        if getattr(mb, name) is not None:
                            setattr(mb, name, getattr(mb, name)[:, :T])
                    ret = returns[chunk, :T] if returns is not None else None
                    sync = acc.no_sync(self.policy) if i < len(chunks) - 1 else nullcontext()
                    with sync:
                        loss, parts = self._micro_loss(mb, adv[chunk, :T], ret, (n_tok, n_seq), stat_denoms)
                        # DDP averages gradients over processes; the loss is already a global sum
                        acc.backward(loss * acc.num_processes)
                    for k, v in parts.items():  # means over the update, maxima for the "_max" keys
                        totals[k] = (max(totals.get(k, -math.inf), float(v)) if k.endswith("_max") else
                                     totals.get(k, 0.0) + float(v) / (cfg.ppo_epochs * cfg.num_minibatches))
                for p in self.params:  # no backward ran (every row skipped): step AdamW as a zero gradient would
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                # the norm is measured even without clipping (max_norm inf): a NaN / inf one skips the step
                gn = acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
                if gn is not None:  # (DeepSpeed clips inside its engine and returns None)
                    totals["policy/grad_norm"] = float(gn)
                    if not math.isfinite(float(gn)) and acc.scaler is None:  # (fp16: the loss scaler skips the step)
                        self._bad = self._bad or "gradient"
                bad = self._agree(self._bad)
                skipped = skipped or bad
                if bad is None:
                    self.opt.step()
                    if self.sampler is not None:  # the copy now lags the weights until the refresh below
                        self.sampler.current = False
                # None, not zeros: the next backward then writes each gradient instead of adding it to zeros
                self.opt.zero_grad(set_to_none=True)
        if self.sampler is not None:  # once per update, not per optimizer step: only the next rollout reads it
            self.sampler.refresh()
        totals.setdefault("loss/policy", 0.0)  # every row skipped: each had advantage 0, so the loss is 0
        totals["perf/trained_frac"] = trained / (B * cfg.ppo_epochs)
        self._update_bad = skipped
        return totals

    # ------------------------------------------------------------------ health
    def _agree(self, bad: str | None) -> str | None:
        """The first non-finite quantity on any process (all take the same branch after it)."""
        if self.acc.num_processes == 1:
            return bad
        code = torch.tensor([QUANTITIES.index(bad) if bad else len(QUANTITIES)], device=self.acc.device)
        first = int(self.acc.gather(code).min())
        return QUANTITIES[first] if first < len(QUANTITIES) else None

    def _health(self, bad: str | None) -> None:
        """Count an update skipped for a non-finite value; stop after ``--max-bad-steps`` in a row."""
        if bad is None:
            self.bad_in_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_row += 1
        step = self.step + 1
        self.acc.print(f"step {step}: non-finite {bad}; update skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise NonFiniteError(f"step {step}: non-finite {bad} ({self.bad_in_row} updates in a row skipped, "
                                 f"--max-bad-steps {self.cfg.max_bad_steps}); the last checkpoint is untouched")

    def _adapt_kl(self, kl_per_seq: float) -> None:
        """Adaptive KL controller (Ziegler et al. 2019): steer the KL toward ``kl_target``."""
        cfg = self.cfg
        err = max(min(kl_per_seq / cfg.kl_target - 1.0, 0.2), -0.2)
        n = cfg.prompts_per_step * cfg.samples_per_prompt * self.acc.num_processes
        self.kl_coef *= 1.0 + err * n / cfg.kl_horizon

    def advantages(self, batch: Rollout, estimator: str | None = None, baseline: str | None = None,
                   scale_rewards: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """(advantages (B, T), value targets (B, T) or None) of a scored rollout, as the config asks;
        ``estimator`` / ``baseline`` / ``scale_rewards`` given: as those flags would (pg_lm/lm/variance.py
        compares estimators on one rollout)."""
        cfg = self.cfg
        estimator = cfg.estimator if estimator is None else estimator
        baseline = cfg.baseline if baseline is None else baseline
        scale_rewards = cfg.scale_rewards if scale_rewards is None else scale_rewards
        greedy = batch.greedy_scores[::cfg.samples_per_prompt] if batch.greedy_scores is not None else None  # (B / G,)
        adv, returns = estimate.advantages(estimator, baseline, batch.rewards, batch.completion_mask,
                                           batch.values, cfg.samples_per_prompt, cfg.gamma, cfg.lam, scale_rewards,
                                           greedy_scores=greedy)
        if cfg.whiten_advantages:  # over the global batch: every process's tokens (REINFORCE++)
            reduce = None
            if self.acc.num_processes > 1:  # op "sum" / "max" over every process's value
                reduce = lambda t, op: getattr(self.acc.gather(t[None]), {"sum": "sum", "max": "amax"}[op])(0)  # noqa: E731
            adv = masked_whiten(adv, batch.completion_mask, reduce=reduce)
        return adv, returns

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.sched.get_last_lr()[0]  # this step's learning rate
        batch, stats = self.rollout()
        adv, returns = self.advantages(batch)
        t1 = time.perf_counter()
        bad = self._agree(_nonfinite({"reward": batch.rewards, "sampler log-prob": batch.sampler_logp, "advantage": adv,
                                      "log-prob": batch.logp}, batch.completion_mask))
        if bad is None:  # a non-finite rollout is not trained on at all
            stats.update(self.update(batch, adv, returns))
            bad = self._update_bad
        self._health(bad)
        stats["health/skipped_steps"] = self.skipped_steps
        if returns is not None and batch.values is not None:
            stats["value/explained_var"] = estimate.explained_variance(batch.values, returns, batch.completion_mask)
        out = {}
        for how in ("mean", "max"):  # one all-reduce per kind for every scalar: means (maxima for "_max") over processes
            keys = sorted(k for k in stats if k.endswith("_max") == (how == "max"))
            if not keys:
                continue
            vals = self.acc.reduce(torch.tensor([float(stats[k]) for k in keys], device=self.acc.device), how)
            out.update(zip(keys, vals.tolist()))
        stats = out
        if "kl/ref" in stats and cfg.kl_target is not None:
            self._adapt_kl(stats["kl/ref"])
        tokens = float(self.acc.reduce(batch.completion_mask.sum().reshape(1), "sum"))
        step_s = time.perf_counter() - t0
        stats.update({"kl/coef": self.kl_coef, "lr": lr, "perf/step_s": step_s,
                      "perf/train_s": time.perf_counter() - t1, "perf/tokens_per_s": tokens / step_s,
                      "advantage/mean": float(masked_mean(adv, batch.completion_mask))})
        self.step += 1
        self.sched.step()  # the next step's learning rate, from the progress made
        if self.step % cfg.samples_every == 0 or self.step == 1:
            self.writer.samples([{"step": self.step, "prompt": p, "completion": c, "reward": float(r)}
                                 for p, c, r in zip(batch.prompts, batch.completions, batch.scores)])
            if self.writer.enabled:  # per token, for `pg-lm view` (decoding is work: the writing process only)
                self.writer.samples(credit.token_rows(batch, adv, self.tok, self.step, cfg.samples_per_prompt,
                                                      cfg.kl_estimator), name=credit.FILE)
        return stats

    # ------------------------------------------------------------------ run
    def evaluate(self) -> dict:
        return evaluate(self, self.eval_ds)

    def train(self) -> dict:
        """Run to ``max_steps`` (or ``max_seconds``); returns the summary written to summary.json.
        With several processes, an error in one stops the others with it (:mod:`.peers`)."""
        peers = PeerWatch(self.acc.process_index) if self.acc.num_processes > 1 else None
        try:
            return self._run()
        except Interrupted:
            raise
        except BaseException as e:
            if peers is not None:
                peers.failed(e)
            raise
        finally:
            if peers is not None:
                peers.close()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, t_start = self.cfg, self.acc, time.perf_counter()
        steps_at_start = self.step
        summary = dict(self.resumed_summary)
        if self.eval_ds is not None and "eval/reward_before" not in summary:
            before = self.evaluate()
            summary["eval/reward_before"] = before["eval/reward"]
            self.writer.log(before, step=self.step)
            acc.print(f"eval before training: {_brief(before)}")
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process),
                   desc="pg_lm", dynamic_ncols=True)
        self.signal, saved = None, None  # saved: (step, folder) of this run's newest checkpoint
        with stop_on_signals(self):
            while self.step < cfg.max_steps:
                signum, out_of_time = self._should_stop()
                if signum:
                    bar.close()
                    self._interrupted(signum, summary, saved[1] if saved and saved[0] == self.step else None)
                if out_of_time:
                    acc.print(f"stopping at step {self.step}: --max-seconds {cfg.max_seconds} reached")
                    break
                stats = self.train_step()
                if self.eval_ds is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    stats.update(self.evaluate())
                if self.step % cfg.log_every == 0 or "eval/reward" in stats:
                    self.writer.log({**stats, "wall_s": self.elapsed()}, step=self.step)
                if cfg.max_seconds is not None:  # a time budget: show the steps it will allow, so the ETA is right
                    done, left = self.step - steps_at_start, max(cfg.max_seconds - self.elapsed(), 0.0)
                    per_step = (time.perf_counter() - t_start) / done
                    bar.total = min(cfg.max_steps, self.step + int(left / per_step) + 1)
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward/mean']:.3f}", tok_s=f"{stats['perf/tokens_per_s']:.0f}")
                if cfg.save_every and self.step % cfg.save_every == 0:
                    saved = self.step, save_checkpoint(self, summary)
        bar.close()
        if self.eval_ds is not None:
            after = self.evaluate()
            summary.update({f"{k}_after": v for k, v in after.items() if k != "eval/reward"})
            summary["eval/reward_after"] = after["eval/reward"]
            self.writer.log(after, step=self.step)
            acc.print(f"eval after training: {_brief(after)} (reward before {summary['eval/reward_before']:.3f})")
            warning = truncation_warning(after, cfg.eval_tokens, "--eval-max-new-tokens")
            if warning:  # the reward of a cut answer says little about what the policy learned
                summary["warnings"] = [warning]
                acc.print(warning)
        summary.update({"train/steps": self.step, "wall_s": self.elapsed(), "train/steps_this_run": self.step - steps_at_start,
                        "num_processes": acc.num_processes, "model": cfg.model})
        if cfg.save_model:
            save_checkpoint(self, summary)
        self.writer.write_json("summary.json", summary)
        rows = self.writer.read_metrics() if acc.is_main_process else []
        evals = [(r["step"], r["eval/reward"]) for r in rows if r.get("eval/reward") is not None]
        self.writer.plot("reward/mean", "reward.png", title="training reward", extra={"eval/reward (greedy, held-out)": evals})
        self.end()
        return summary

    def _interrupted(self, signum: int, summary: dict, path=None):
        """Save (unless ``path`` already holds this step), end, raise :class:`Interrupted`."""
        path = path or save_checkpoint(self, summary)
        self.writer.write_json("summary.json", {**summary, "train/steps": self.step,
                                                "interrupted": signal.Signals(signum).name})
        self.end()
        raise Interrupted(signum, self.step, path)

    def _should_stop(self) -> tuple[int, bool]:
        """(a signal caught on any process, or 0; whether ``--max-seconds`` is spent), agreed by all
        processes so that every one stops at the same step."""
        late = self.cfg.max_seconds is not None and self.elapsed() > self.cfg.max_seconds
        if self.acc.num_processes == 1:
            return self.signal or 0, late
        flags = self.acc.gather(torch.tensor([[self.signal or 0, int(late)]], device=self.acc.device))
        return int(flags[:, 0].max()), bool(flags[:, 1].max())

    def end(self) -> None:
        """Close the trackers and, with several processes, free the process group, so the process
        exits cleanly. ``destroy_process_group`` alone does not free it while DDP's reducer holds it:
        gloo's worker threads then live into interpreter shutdown, and one that drops the last
        reference to a just-finished collective's tensor needs the GIL there, which aborts the
        process (SIGABRT, "terminate called without an active exception"; 8 of 112 two-process
        runs of tests/dist_grad_worker.py here, 0 of 45 with this). So the DDP wrapper goes first
        (``self.policy`` becomes the plain model); the group's destructor then waits for its
        workers. ``train`` calls this at its end."""
        acc = self.acc
        if acc.num_processes > 1:
            self.policy = acc.unwrap_model(self.policy)
            acc.free_memory()  # the accelerator's own references to the prepared model; collects garbage
        acc.end_training()
