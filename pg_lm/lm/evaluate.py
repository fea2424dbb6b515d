"""Greedy evaluation on held-out prompts: the mean total reward (accuracy for 0/1 rewards)."""

from __future__ import annotations

import torch

from .sampling import sample


@torch.no_grad()
def evaluate(trainer, dataset) -> dict:
    """``{"eval/reward": mean, "eval/<fn>": mean per reward function}`` over the first
    ``cfg.eval_size`` rows of ``dataset``, split across processes and gathered."""
    cfg, acc = trainer.cfg, trainer.acc
    n = min(cfg.eval_size, len(dataset))
    rows = dataset.select(range(acc.process_index, n, acc.num_processes))
    lm = acc.unwrap_model(trainer.policy).lm
    trainer.policy.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(rows), cfg.eval_batch_size):
        chunk = rows.select(range(i, min(i + cfg.eval_batch_size, len(rows))))
        cols = {c: chunk[c] for c in chunk.column_names if c != "prompt"}
        with acc.autocast():
            batch = sample(lm, trainer.tok, chunk["prompt"], cols, 1, cfg.eval_max_new_tokens, greedy=True,
                           chat_template=cfg.chat_template, max_prompt_length=cfg.max_prompt_length)
        per_fn, dense = trainer.rewards.score(batch.prompts, batch.completions, batch.columns, batch.lengths.tolist())
        for k, v in [("eval/reward", dense.sum(1))] + [(f"eval/{k}", v) for k, v in per_fn.items()]:
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    keys = sorted(sums) or ["eval/reward"]
    total = acc.reduce(torch.tensor([sums.get(k, 0.0) for k in keys], device=acc.device), "sum")
    return {k: float(v) / max(n, 1) for k, v in zip(keys, total.tolist())}
