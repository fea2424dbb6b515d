"""Worker for tests/test_lm_distributed.py: the gradient of ``Trainer.update`` on a FIXED
global batch, whatever the number of processes and micro-batch size.

    torchrun --standalone --nproc_per_node 2 tests/dist_grad_worker.py MODEL_DIR OUT_DIR [--train]
    python tests/dist_grad_worker.py MODEL_DIR OUT_DIR          # one process, the whole batch
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
        tests/dist_grad_worker.py MODEL_DIR OUT_DIR --train [--resume]     # FSDP2 (gloo on a CPU)

The global batch has 8 rows (4 prompts x G = 2, prompts of different lengths, completions
of lengths 1..8) and fixed advantages / returns. Process ``rank`` of ``world`` takes the
contiguous rows ``[rank * 8 / world, (rank + 1) * 8 / world)``. ``trainer.opt.step`` is
replaced by a function that copies every trainable parameter's gradient, so nothing moves
and each case sees the same weights. Rank 0 writes ``OUT_DIR/grads_<world>.pt``:
``{case: {param name: grad}}``. With ``--train`` it then runs one real training step with
a held-out evaluation of 1 prompt (fewer prompts than processes) and writes
``OUT_DIR/run/summary.json`` and its checkpoint, after a step on episodes of many turns
(``OUT_DIR/env_step.json``); ``--resume`` continues the run for a step.
Each rank writes the names of its threads after training to
``OUT_DIR/threads_<rank>.json`` (Linux; ``null`` elsewhere): gloo's must be gone (``Trainer.end``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch

PROMPT_IDS = [[10, 11, 12], [13, 14, 15, 16, 17, 18], [19], [20, 21, 22, 23, 24]]  # 4 prompts, P <= 6
LENGTHS = [1, 5, 3, 8, 2, 7, 4, 6]  # completion lengths of the 8 rows (G = 2 per prompt)
G, T = 2, 8

# case -> overrides of the trainer's config (dataclasses.replace: validated like a new config)
CASES = {
    "token-mean": {},
    "token-mean/micro3": {"micro_batch_size": 3},
    "token-mean/micro2": {"micro_batch_size": 2},  # whole groups: the shared-prompt forward
    "seq-mean-token-mean": {"loss_agg": "seq-mean-token-mean"},
    "seq-mean-token-mean/micro3": {"loss_agg": "seq-mean-token-mean", "micro_batch_size": 3},
    "seq-mean-token-sum-norm": {"loss_agg": "seq-mean-token-sum-norm"},
    "seq-mean-token-sum-norm/micro3": {"loss_agg": "seq-mean-token-sum-norm", "micro_batch_size": 3},
}
# rows whose advantage is zeroed: a whole group (0, 1) on rank 0 of 2 and a lone row (5) on rank 1, so
# the ranks have different numbers of live rows and rank 0 must top up with an inert one
ZERO_ROWS = [0, 1, 5]
CASES.update({
    "zeroed": {"_zero_rows": ZERO_ROWS, "skip_zero_advantage": False},  # every row through the backward
    "zeroed/skip": {"_zero_rows": ZERO_ROWS},
    "zeroed/skip-micro2": {"_zero_rows": ZERO_ROWS, "micro_batch_size": 2},
})
GAE_CASES = {"gae": {}, "gae/micro3": {"micro_batch_size": 3}}
# episodes of many turns: every third completion position an observation token (attended, not trained on)
CASES.update({"episodes": {"_episodes": True}, "episodes/micro3": {"_episodes": True, "micro_batch_size": 3}})


def global_batch(pad_id: int):
    """(Rollout, advantages, returns) of the whole global batch; identical in every process."""
    from pg_lm.lm.rollout import Rollout

    P = max(map(len, PROMPT_IDS))
    prompt_ids = torch.full((4, P), pad_id)
    prompt_mask = torch.zeros(4, P, dtype=torch.long)
    for i, p in enumerate(PROMPT_IDS):  # left padding
        prompt_ids[i, P - len(p) :] = torch.tensor(p)
        prompt_mask[i, P - len(p) :] = 1
    g = torch.Generator().manual_seed(1234)
    completion_ids = torch.randint(4, 90, (8, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()  # (8, T)
    completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_id))
    adv = torch.randn(8, T, generator=g) * mask
    returns = torch.randn(8, T, generator=g) * mask
    batch = Rollout(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        completion_ids=completion_ids, completion_mask=mask, truncated=torch.zeros(8, dtype=torch.bool),
        prompts=[f"p{i // G}" for i in range(8)], completions=[""] * 8, group_size=G,
    )
    return batch, adv, returns


def as_episodes(batch):
    """``batch`` as episodes of many turns: positions 2, 5 (of the real ones) observation tokens, each
    turn's last action token marked (the same tokens, attended; fewer of them trained on)."""
    obs = (torch.arange(T)[None] % 3 == 2) & batch.completion_mask.bool()  # (8, T)
    ep = dataclasses.replace(batch, completion_attention=batch.completion_mask.clone(),
                             completion_mask=batch.completion_mask * ~obs)
    ep.turn_end = (torch.arange(T)[None] % 3 == 1) & ep.completion_mask.bool()
    return ep


def _zero(prompts, completions, **_):
    return [0.0] * len(completions)


def _length(prompts, completions, **_):  # varies within a group: the training runs move the weights
    return [float(len(c)) for c in completions]


def make_trainer(model_dir: str, output_dir: str, reward=_zero, **kw):
    from datasets import Dataset

    from pg_lm.lm import LMConfig
    from pg_lm.lm.trainer import Trainer

    kw = {"prompts_per_step": 4, "samples_per_prompt": G, "max_new_tokens": T, "max_grad_norm": None, "lr": 1e-3,
          "lora_r": 0, "lr_schedule": "constant", "dynamic_sampling": False,  # the batch as sampled
          "progress": False, "mixed_precision": "no", **kw}  # fp32: auto picks bf16 on some CPUs
    cfg = LMConfig(model=model_dir, output_dir=output_dir, **kw)
    return Trainer(cfg, [reward],
                   Dataset.from_dict({"prompt": ["a", "bb", "ccc", "dddd"]}))


def gradients(trainer, cases: dict, with_returns: bool) -> dict:
    """{case: {name: grad}} from ``trainer.update`` on this process's share of the global batch."""
    acc = trainer.acc
    world, rank = acc.num_processes, acc.process_index
    batch, adv, returns = global_batch(trainer.tok.pad_token_id)
    rows = torch.arange(rank * 8 // world, (rank + 1) * 8 // world)
    local = batch.select(rows, group_size=G)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        setattr(local, name, getattr(local, name).to(acc.device))
    adv, returns = adv.to(acc.device), returns.to(acc.device)
    named = [(n, p) for n, p in acc.unwrap_model(trainer.policy).named_parameters() if p.requires_grad]
    captured: dict = {}
    # FSDP2: each process holds a shard of each gradient (a DTensor); full_tensor() gathers it on all
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
    trainer.opt.step = lambda *a, **k: captured.update({n: full(p.grad.detach()).cpu().clone() for n, p in named})
    base, out = trainer.cfg, {}
    for case, overrides in cases.items():
        overrides = dict(overrides)
        a = adv.clone()
        a[overrides.pop("_zero_rows", [])] = 0.0
        part = local
        if overrides.pop("_episodes", False):
            part = as_episodes(local)
            a = a * as_episodes(batch).completion_mask.to(a)
        trainer.cfg = dataclasses.replace(base, **overrides)
        captured.clear()
        stats, _ = trainer.update(part, a[rows], returns[rows] if with_returns else None)
        skipped = "skip" in case.split("/")[-1]
        assert (stats["perf/trained_frac"] < 1) == skipped, (case, stats["perf/trained_frac"])
        assert captured, f"{case}: the optimizer step was never reached"
        out[case] = dict(captured)
    trainer.cfg = base
    return out


def train_run(model_dir: str, out_dir: str, **kw):
    """``OUT_DIR/run``: steps of real training (``kw``: max_steps, resume), with a 1-prompt held-out
    evaluation (fewer prompts than processes); returns the trainer after ``train()``."""
    from datasets import Dataset

    run = make_trainer(model_dir, str(Path(out_dir) / "run"), _length, eval_size=1, max_new_tokens=4,
                       eval_max_new_tokens=3, **kw)
    run.eval_ds = Dataset.from_dict({"prompt": ["x", "yy", "zzz"]})
    run.train()
    return run


class Count:
    """An environment: two turns, reward 1 for an action that holds a digit."""

    def reset(self, *, seed, row=None):
        self.n = 0
        return f"count {seed % 7}"

    def step(self, action):
        self.n += 1
        return "next", float(any(c.isdigit() for c in action)), self.n >= 2, False, {}


def env_step(model_dir: str, out_dir: str) -> None:
    """One training step on episodes, then the evaluation on 3 held-out seeds split over the
    processes; rank 0 writes both's metrics to ``OUT_DIR/env_step.json`` (the run is not ended:
    the launch's training run after it needs the process group)."""
    from pg_lm.lm import LMConfig
    from pg_lm.lm.trainer import Trainer

    cfg = LMConfig(model=model_dir, output_dir=str(Path(out_dir) / "env_run"), prompts_per_step=2, samples_per_prompt=G,
                   max_new_tokens=3, max_turns=3, max_steps=1, eval_size=3, lora_r=0, progress=False,
                   mixed_precision="no", credit="turn")
    run = Trainer(cfg, [], None, env=Count)
    stats = {k: float(v) for k, v in run.train_step().items()}
    stats.update(run.evaluate())
    if run.acc.is_main_process:
        (Path(out_dir) / "env_step.json").write_text(json.dumps(stats))


def resume(model_dir: str, out_dir: str) -> None:
    """Continue ``OUT_DIR/run`` (saved by a ``--train`` launch) for one more step."""
    train_run(model_dir, out_dir, max_steps=2, resume=True)


def main(model_dir: str, out_dir: str, train: bool = False) -> dict:
    out = Path(out_dir)
    tr = make_trainer(model_dir, str(out / "grad_run"))
    grads = gradients(tr, CASES, with_returns=False)
    tr = make_trainer(model_dir, str(out / "grad_run_gae"), estimator="gae")
    grads.update(gradients(tr, GAE_CASES, with_returns=True))
    world = tr.acc.num_processes
    if tr.acc.is_main_process:
        torch.save(grads, out / f"grads_{world}.pt")
    if train:
        env_step(model_dir, out_dir)
        del tr  # the gradient trainers' DDP wrappers hold the process group: run.end() must be able to free it
        gc.collect()
        run = train_run(model_dir, out_dir, max_steps=1)
        (out / f"threads_{run.acc.process_index}.json").write_text(json.dumps(thread_names()))
    return grads


def thread_names() -> list[str] | None:
    """This process's native threads by name (Linux's /proc), None where that cannot be read."""
    try:
        return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    except OSError:
        return None


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--resume" in sys.argv:
        resume(args[0], args[1])
    else:
        main(args[0], args[1], train="--train" in sys.argv)
