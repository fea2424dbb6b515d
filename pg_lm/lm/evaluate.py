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
    lm, context = trainer.sampling_lm()
    trainer.policy.eval()
    # the same keys in the same order on every process, even one that got no rows (n < processes):
    # a key list built from the rows seen would make the all-reduce below mismatch and hang
    per_key = {f"eval/{name}": name for name in trainer.rewards.names if name != "reward"}  # "reward" is the total
    sums = dict.fromkeys(["eval/reward", *per_key], 0.0)
    with context():  # entered on every process, even one with no rows: under FSDP2 it gathers the weights
        for i in range(0, len(rows), cfg.eval_batch_size):
            chunk = rows.select(range(i, min(i + cfg.eval_batch_size, len(rows))))
            cols = {c: chunk[c] for c in chunk.column_names if c != "prompt"}
            batch = sample(lm, trainer.tok, chunk["prompt"], cols, 1, cfg.eval_max_new_tokens, greedy=True,
                           chat_template=cfg.chat_template, max_prompt_length=cfg.max_prompt_length,
                           cpu_layer=trainer.cpu_layer, truncate_prompts=cfg.long_prompts == "truncate-left")
            per_fn, dense = trainer.rewards.score(batch.prompts, batch.completions, batch.columns,
                                                  batch.lengths.tolist())
            sums["eval/reward"] += float(dense.sum())
            for key, name in per_key.items():
                sums[key] += float(per_fn[name].sum())
    keys = list(sums)
    total = acc.reduce(torch.tensor([sums[k] for k in keys], device=acc.device), "sum")
    return {k: float(v) / max(n, 1) for k, v in zip(keys, total.tolist())}
