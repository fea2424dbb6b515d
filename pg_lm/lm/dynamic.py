"""DAPO's dynamic sampling (Yu et al. 2025, ``--dynamic-sampling``): a step trains on groups whose
samples got different rewards, drawing extra rounds of prompts to replace the groups that did not.

Under a group baseline a group whose G samples all scored the same has advantage 0 on every token:
it costs a forward and teaches nothing. The extra rounds' prompts are a function of (seed, step,
round), like the first round's, so a resumed run draws the same.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pg_lm.core import zero_spread_groups

from .rollout import Rollout, concat_rollouts


def informative(first: Rollout, zero: Tensor, draw_round: Callable[[int], Rollout], cfg, coll, pad_id: int,
                step: int, print_fn=print) -> tuple[Rollout, dict]:
    """(a batch of ``cfg.prompts_per_step`` groups, its sampling statistics): ``first``'s groups with a
    reward spread (``zero``: (groups,) bool, those without), then those of the rounds
    ``draw_round(1)``, ``draw_round(2)``, ... up to ``cfg.max_sampling_rounds`` extra rounds. Every
    process samples every round (sampling may be collective, FSDP2) until all are full: ``coll``
    agrees on the largest shortfall. Still short then: a warning, and the batch is filled up with
    ``first``'s zero-spread groups, whose advantages are 0 under a group baseline, so the step trains
    on the informative groups it has. ``step``: the step under way (0-based), for the warning."""
    G, need = cfg.samples_per_prompt, cfg.prompts_per_step
    parts, keep, rounds = [first], [~zero], 0  # keep: (groups,) bool per part
    while True:
        short = int(coll.max(need - sum(int(k.sum()) for k in keep)))
        if short <= 0 or rounds == cfg.max_sampling_rounds:
            break
        rounds += 1
        part = draw_round(rounds)
        parts.append(part)
        keep.append(~zero_spread_groups(part.scores, G))
    chosen = [(i, g) for i, k in enumerate(keep) for g in k.nonzero().flatten().tolist()][:need]
    filler = need - len(chosen)
    chosen += [(0, g) for g in zero.nonzero().flatten().tolist()][:filler]
    if short > 0:
        print_fn(f"step {step + 1}: dynamic sampling is {short} informative group(s) short after "
                 f"--max-sampling-rounds {cfg.max_sampling_rounds}; the batch is filled up with zero-spread groups")
    picked = []
    for i, part in enumerate(parts):
        groups = sorted(g for j, g in chosen if j == i)
        if groups:
            rows = torch.tensor([g * G + k for g in groups for k in range(G)], device=part.prompt_ids.device)
            picked.append(part.select(rows, group_size=G))
    return concat_rollouts(picked, pad_id), {
        "sampling/rounds": rounds, "sampling/cap_reached": float(short > 0), "sampling/filler_frac": filler / need}
