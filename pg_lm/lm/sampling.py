"""Batched sampling of completions -> :class:`Rollout`.

Each prompt is encoded once (left-padded) and sampled G times with ``generate``
(KV cache). Completion masks come from the position of the first EOS, never from
the pad id (pad often equals EOS).
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
    prompts: list[str]  # (B,) prompt texts as the user gave them
    completions: list[str]  # (B,) decoded completions (special tokens stripped)
    columns: dict = field(default_factory=dict)  # other dataset fields, each a (B,) list
    logp: Tensor | None = None  # (B, T) log π_old(token) from the learner, no grad
    ref_logp: Tensor | None = None  # (B, T) log π_ref(token)
    values: Tensor | None = None  # (B, T) V(s_t) before token t
    rewards: Tensor | None = None  # (B, T) per-token reward (task reward on the last token, - KL)
    scores: Tensor | None = None  # (B,) total task reward of each completion

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # (B, P + T)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], 1)

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1).long()  # (B,)

    def select(self, idx: Tensor) -> "Rollout":
        """The sub-batch of rows ``idx`` (tensors sliced, lists picked)."""
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
        return Rollout(**kw)


def format_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[str]:
    """Apply the tokenizer's chat template (one user turn) when it has one and it is wanted."""
    if not chat_template or getattr(tokenizer, "chat_template", None) is None:
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool, max_prompt_length: int | None):
    """Left-padded ``(input_ids, attention_mask)``, each (N, P). A prompt over the limit is an error."""
    texts = format_prompts(tokenizer, prompts, chat_template)
    add_special = not (chat_template and getattr(tokenizer, "chat_template", None) is not None)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    if max_prompt_length is not None:
        lens = enc["attention_mask"].sum(1)
        if (lens > max_prompt_length).any():
            i = int(lens.argmax())
            raise ValueError(
                f"prompt {i} is {int(lens[i])} tokens, over --max-prompt-length {max_prompt_length}: {prompts[i][:80]!r}"
            )
    return enc["input_ids"], enc["attention_mask"]


def completion_mask_from_ids(ids: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """(mask (B, T) float, truncated (B,) bool) from the first EOS in each row.

    The EOS token itself is part of the completion (it is an action: stopping).
    """
    is_eos = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))  # (B, T)
    T = ids.shape[1]
    has_eos = is_eos.any(1)  # (B,)
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, T, dtype=torch.long))
    lengths = torch.where(has_eos, first + 1, first)  # (B,)
    mask = (torch.arange(T, device=ids.device)[None] < lengths[:, None]).float()
    return mask, ~has_eos


def eos_token_ids(tokenizer, lm) -> list[int]:
    ids = lm.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def sample(
    lm,
    tokenizer,
    prompts: list[str],
    columns: dict,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    chat_template: bool = True,
    max_prompt_length: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions per prompt. ``lm`` is the unwrapped causal LM."""
    device = next(lm.parameters()).device
    ids, am = encode_prompts(tokenizer, prompts, chat_template, max_prompt_length)
    ids = ids.repeat_interleave(num_samples, 0).to(device)  # (B, P)
    am = am.repeat_interleave(num_samples, 0).to(device)  # (B, P)
    eos = eos_token_ids(tokenizer, lm)
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    if greedy:
        gen.update(do_sample=False)
    else:
        gen.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    out = lm.generate(input_ids=ids, attention_mask=am, **gen)
    comp = out[:, ids.shape[1] :]  # (B, T)
    if comp.shape[1] == 0:  # max_new_tokens reached zero tokens: keep one column so shapes stay valid
        comp = torch.full((ids.shape[0], 1), tokenizer.pad_token_id, device=device, dtype=ids.dtype)
    mask, truncated = completion_mask_from_ids(comp, eos)
    T = max(int(mask.sum(1).max()), 1)  # trim columns that are padding in every row
    comp, mask = comp[:, :T], mask[:, :T]
    comp = torch.where(mask.bool(), comp, torch.full_like(comp, tokenizer.pad_token_id))
    lengths = mask.sum(1).long().tolist()
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(comp.tolist(), lengths)]
    rep = lambda xs: [x for x in xs for _ in range(num_samples)]
    return Rollout(
        prompt_ids=ids, prompt_mask=am, completion_ids=comp, completion_mask=mask, truncated=truncated,
        prompts=rep(prompts), completions=texts, columns={k: rep(v) for k, v in columns.items()},
    )
