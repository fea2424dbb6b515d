"""Worker for tests/test_lm_variants_distributed.py: ``Trainer.advantages`` with
``--whiten-advantages`` (REINFORCE++ and REINFORCE++-baseline) on a FIXED global batch of 8 rows,
whatever the number of processes.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml --num_processes 2 \
        tests/dist_whiten_worker.py MODEL_DIR OUT_DIR
    python tests/dist_whiten_worker.py MODEL_DIR OUT_DIR          # one process, the whole batch

Process ``rank`` of ``world`` takes rows ``[rank * 8 / world, (rank + 1) * 8 / world)`` (whole
groups of G = 2); rank 0 gathers the advantages and writes ``OUT_DIR/adv_<world>.pt``: ``{case: (8, T)}``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dist_grad_worker import G, LENGTHS, T, global_batch, make_trainer

CASES = {"reinforce_pp": {"baseline": "none"}, "reinforce_pp_baseline": {"baseline": "group_mean"}}


def global_rewards() -> torch.Tensor:
    """(8, T): a task reward on each completion's last token and a small per-token term (a KL penalty's place)."""
    g = torch.Generator().manual_seed(99)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()
    dense = -0.05 * torch.rand(8, T, generator=g) * mask
    last = torch.tensor(LENGTHS) - 1
    dense[torch.arange(8), last] += torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    return dense


def main(model_dir: str, out_dir: str) -> dict:
    out = Path(out_dir)
    tr = make_trainer(model_dir, str(out / "run"), whiten_advantages=True)
    acc = tr.acc
    world, rank = acc.num_processes, acc.process_index
    batch, _, _ = global_batch(tr.tok.pad_token_id)
    batch.rewards = global_rewards()
    rows = torch.arange(rank * 8 // world, (rank + 1) * 8 // world)
    local = batch.select(rows, group_size=G)
    for name in ("completion_mask", "rewards"):
        setattr(local, name, getattr(local, name).to(acc.device))
    base, adv = tr.cfg, {}
    for case, overrides in CASES.items():
        tr.cfg = dataclasses.replace(base, **overrides)
        a, _ = tr.advantages(local)  # (8 / world, T)
        adv[case] = acc.gather(a.contiguous()).cpu()  # (8, T), rank order = row order
    if acc.is_main_process:
        torch.save(adv, out / f"adv_{world}.pt")
    tr.end()
    return adv


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
