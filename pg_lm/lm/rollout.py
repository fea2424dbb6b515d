"""The rollout record: one batch of sampled completions and everything the trainer adds to it,
with its row operations (select, concatenate, set the greedy rows apart).

Shapes: B rows = prompts x G samples (the samples of a prompt contiguous), P prompt tokens,
T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One batch of B = prompts x G completions. Samples of a prompt are contiguous.

    Tensors are filled in stages: sampling sets the ids and masks, the trainer adds
    log-probs, values and rewards. Shapes: P prompt tokens, T completion tokens.
    """

    prompt_ids: Tensor  # (B, P) left-padded prompt tokens
    prompt_mask: Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: Tensor  # (B, T) right-padded completion tokens (EOS included when sampled)
    completion_mask: Tensor  # (B, T) float, 1 on the first `length` tokens
    truncated: Tensor  # (B,) bool: hit max_new_tokens without EOS
    prompts: list  # (B,) prompts as the user gave them: strings, or lists of chat messages
    completions: list[str]  # (B,) decoded completions (special tokens stripped)
    columns: dict = field(default_factory=dict)  # other dataset fields, each a (B,) list
    logp: Tensor | None = None  # (B, T) log π_old(token) from the learner, no grad
    sampler_logp: Tensor | None = None  # (B, T) log-prob of each token as the sampler drew it (its own numeric path), 0 on padding
    ref_logp: Tensor | None = None  # (B, T) log π_ref(token)
    values: Tensor | None = None  # (B, T) V(s_t) before token t
    rewards: Tensor | None = None  # (B, T) per-token reward (task reward on the last token, - KL)
    scores: Tensor | None = None  # (B,) total task reward of each completion
    greedy_scores: Tensor | None = None  # (B,) ReMax: the total task reward of the row's prompt's greedy completion
    group_size: int = 1  # G: rows [iG, (i+1)G) are samples of the same prompt
    turn_end: Tensor | None = None  # (B, T) bool, episodes of many turns (episodes.py): each turn's last action token
    completion_attention: Tensor | None = None  # (B, T) 1 on every real token, observations too (None: completion_mask)
    episodes: list | None = None  # (B,) an episode's turns, each {"action", "reward", "observation"} (text)
    env_s: float = 0.0  # seconds the environments took to reset and step (episodes)

    @property
    def attention(self) -> Tensor:
        """(B, T) the completion side's attention mask: every real token (actions and, in an episode of
        many turns, observations); the loss and every statistic use ``completion_mask`` (actions only)."""
        return self.completion_mask if self.completion_attention is None else self.completion_attention

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1).long()  # (B,)

    def stats(self, per_fn: dict, pass_threshold: float) -> dict:
        """The batch's reward and length statistics (``per_fn``: each reward function's (B,) rewards):
        ``reward/solved_frac`` is the share of completions scoring ``pass_threshold`` or more,
        ``completion/distinct_frac`` the share of a group's completions that differ from one another."""
        lengths = self.completion_mask.sum(1).float()  # (B,) action tokens
        G, seqs = self.group_size, [tuple(r[:int(n)]) for r, n in zip(self.completion_ids.tolist(), self.attention.sum(1))]
        out = {"reward/mean": self.scores.mean(), "reward/std": self.scores.std() if len(self.scores) > 1 else 0.0,
               **{f"reward/{k}": v.mean() for k, v in per_fn.items()},
               "reward/solved_frac": (self.scores >= pass_threshold).float().mean(),
               "completion/length": lengths.mean(), "completion/length_max": lengths.max(),
               "completion/truncated_frac": self.truncated.float().mean(),
               "completion/distinct_frac": sum(len(set(seqs[i : i + G])) for i in range(0, len(seqs), G)) / len(seqs)}
        if self.greedy_scores is not None:  # ReMax's baseline: the greedy completions' mean reward
            out["reward/greedy"] = self.greedy_scores.mean()
        if self.turn_end is not None:  # episodes of many turns
            out["episode/turns"] = self.turn_end.sum(1).float().mean()
            out["perf/env_s"] = self.env_s
        return out

    def select(self, idx: Tensor, group_size: int = 1) -> "Rollout":
        """The sub-batch of rows ``idx`` (tensors sliced, lists picked); say ``group_size``
        when ``idx`` is a run of whole groups in order."""
        pick = lambda xs: [xs[i] for i in idx.tolist()]
        kw = {}
        for name, val in self.__dict__.items():
            if isinstance(val, Tensor):
                kw[name] = val[idx]
            elif isinstance(val, list):
                kw[name] = pick(val)
            elif isinstance(val, dict):
                kw[name] = {k: pick(v) for k, v in val.items()}
            else:
                kw[name] = val
        kw["group_size"] = group_size
        return Rollout(**kw)


def _pad(x: Tensor, width: int, value, left: bool = False) -> Tensor:
    """``x`` (B, w) padded with ``value`` to (B, width), on the right (or the left)."""
    pad = x.new_full((x.shape[0], width - x.shape[1]), value)
    return torch.cat([pad, x] if left else [x, pad], 1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """The rows of every rollout in ``parts``, in order, as one (all of the same group size; prompts
    are left-padded and completions right-padded to the widest). Fields set in only some parts
    are an error: the trainer joins rollouts before it adds log-probs and values."""
    first = parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    kw = {}
    for name, val in first.__dict__.items():
        vals = [getattr(r, name) for r in parts]
        if isinstance(val, Tensor) and val.dim() == 2:  # (B, P) prompt side, (B, T) completion side
            left = name.startswith("prompt")
            width, fill = (P, pad_id if name == "prompt_ids" else 0) if left else (T, pad_id if name == "completion_ids" else 0)
            kw[name] = torch.cat([_pad(v, width, fill, left) for v in vals])
        elif isinstance(val, Tensor):
            kw[name] = torch.cat(vals)
        elif isinstance(val, list):
            kw[name] = [x for v in vals for x in v]
        elif isinstance(val, dict):
            kw[name] = {k: [x for v in vals for x in v[k]] for k in val}
        elif val is None:
            if any(v is not None for v in vals):
                raise ValueError(f"rollout field {name} is set in only some of the parts")
            kw[name] = None
        else:
            kw[name] = val
    return Rollout(**kw)


def split_greedy(batch: Rollout, num_samples: int) -> tuple[Rollout, Rollout]:
    """(the sampled rows, groups of ``num_samples``; the greedy rows, one per prompt) of a rollout
    sampled with ``greedy_extra`` (groups of ``num_samples`` + 1 rows, the greedy one last)."""
    per = num_samples + 1
    rows = torch.arange(len(batch.completions), device=batch.completion_ids.device)
    greedy = rows % per == per - 1  # (N (G + 1),)
    return _trim(batch.select(rows[~greedy], group_size=num_samples)), _trim(batch.select(rows[greedy]))


def _trim(batch: Rollout) -> Rollout:
    """``batch`` without the completion columns that are padding in every row."""
    T = max(int(batch.completion_mask.sum(1).max()), 1)
    for name, val in batch.__dict__.items():
        if isinstance(val, Tensor) and val.dim() == 2 and not name.startswith("prompt"):
            setattr(batch, name, val[:, :T])
    return batch
