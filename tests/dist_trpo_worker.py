"""Worker for tests/test_lm_trpo.py: one ``--update trpo`` step on dist_grad_worker's FIXED global
batch (8 rows, fixed advantages and returns), whatever the number of processes.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml --num_processes 2 \\
        tests/dist_trpo_worker.py MODEL_DIR OUT_DIR
    python tests/dist_trpo_worker.py MODEL_DIR OUT_DIR          # one process, the whole batch

Process ``rank`` of ``world`` takes the contiguous rows ``[rank * 8 / world, (rank + 1) * 8 / world)``.
Rank 0 writes ``OUT_DIR/trpo_<world>.pt``: ``{"stats": the step's statistics, "before" / "weights": {name:
tensor}} before and after the step, with a value head (GAE) so that its AdamW step is covered too; every rank
checks that its weights equal rank 0's (the replicas stayed in sync).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_grad_worker as grad_worker  # noqa: E402


def main(model_dir: str, out_dir: str) -> dict:
    from pg_lm.lm import trpo

    tr = grad_worker.make_trainer(model_dir, str(Path(out_dir) / "run"), update="trpo", estimator="gae",
                                  max_kl=0.01, cg_damping=0.01)
    acc = tr.acc
    world, rank = acc.num_processes, acc.process_index
    batch, adv, returns = grad_worker.global_batch(tr.tok.pad_token_id)
    rows = torch.arange(rank * 8 // world, (rank + 1) * 8 // world)
    local = batch.select(rows, group_size=grad_worker.G)
    policy = acc.unwrap_model(tr.policy)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats, bad = trpo.update(tr, local, adv[rows], returns[rows])
    assert bad is None and stats["policy/step_fraction"] > 0, stats
    weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
    if world > 1:  # every replica took the same step
        flat = torch.cat([w.reshape(-1) for w in weights.values()])
        first = acc.gather(flat[None])[0]
        assert torch.equal(first, flat), "the replicas' weights differ after the step"
    out = {"stats": stats, "before": before, "weights": weights}
    if acc.is_main_process:
        torch.save(out, Path(out_dir) / f"trpo_{world}.pt")
    tr.end()
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
