"""Batched sampling of completions -> :class:`Rollout`.

Each prompt is encoded once (left-padded) and sampled G times with ``generate``
(KV cache). Completion masks come from the position of the first EOS, never from
the pad id (pad often equals EOS).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .rollout import Rollout


def format_prompts(tokenizer, prompts: list, chat_template: bool, system_prompt: str | None = None) -> list[str]:
    """The texts the model reads. A prompt is a string (one user turn) or a list of chat messages
    (``[{"role": ..., "content": ...}]``, used as given); both go through the tokenizer's chat
    template when it has one and it is wanted, after a system message ``system_prompt`` (unless
    the messages start with their own). Without a template a string is used as it is (after
    ``system_prompt`` and a blank line), and chat messages are an error."""
    templated = chat_template and getattr(tokenizer, "chat_template", None) is not None
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not templated:
            out.append(p if system_prompt is None else f"{system_prompt}\n\n{p}")
            continue
        if not isinstance(p, str) and not (isinstance(p, (list, tuple)) and all(isinstance(m, dict) for m in p)):
            raise ValueError(f"prompt {i} is {type(p).__name__}: a prompt is a string or a list of chat messages "
                             f"[{{'role': ..., 'content': ...}}], got {str(p)[:80]!r}")
        if not templated:
            why = "--chat-template is off" if chat_template is False else "the tokenizer has no chat template"
            raise ValueError(f"prompt {i} is a list of chat messages, but {why}: give prompts as strings")
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p]
        if system_prompt is not None and (not msgs or msgs[0].get("role") != "system"):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def _adds_special(tokenizer, chat_template: bool) -> bool:
    """Whether the tokenizer adds its special tokens (BOS): not when a chat template wrote them."""
    return not (chat_template and getattr(tokenizer, "chat_template", None) is not None)


def fit_prompts(dataset, tokenizer, chat_template: bool, max_len: int, long_prompts: str, what: str,
                system_prompt: str | None = None):
    """(``dataset`` with its prompts checked against ``max_len`` tokens, all at once before any
    training; a note for the console or None): ``error`` raises a ``ValueError`` counting them,
    ``drop`` leaves them out (the note says how many), ``truncate-left`` keeps them (sampling
    keeps their last ``max_len`` tokens)."""
    prompts = dataset["prompt"]
    lengths = []
    for i in range(0, len(prompts), 1024):
        texts = format_prompts(tokenizer, prompts[i : i + 1024], chat_template, system_prompt)
        lengths += [len(ids) for ids in tokenizer(texts, add_special_tokens=_adds_special(tokenizer, chat_template))["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > max_len]
    if not over or long_prompts == "truncate-left":
        return dataset, None
    longest = max(over, key=lambda i: lengths[i])
    counted = (f"{len(over)} of {len(prompts)} {what} prompts are longer than --max-prompt-length {max_len} tokens "
               f"(the longest, row {longest}, has {lengths[longest]})")
    if long_prompts == "error":
        raise ValueError(f"{counted}: raise the limit, or pass --long-prompts truncate-left or drop")
    if len(over) == len(prompts):
        raise ValueError(f"{counted}: --long-prompts drop would leave none")
    skip = set(over)
    return dataset.select([i for i in range(len(prompts)) if i not in skip]), f"{counted}: left out (--long-prompts drop)"


def encode_prompts(tokenizer, prompts: list, chat_template: bool, max_prompt_length: int | None,
                   truncate_left: bool = False, system_prompt: str | None = None):
    """Left-padded ``(input_ids, attention_mask)``, each (N, P). A prompt over the limit is an error,
    or, with ``truncate_left``, loses its first tokens."""
    texts = format_prompts(tokenizer, prompts, chat_template, system_prompt)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=_adds_special(tokenizer, chat_template))
    if max_prompt_length is not None and truncate_left:  # left padding: each prompt ends in the last column
        return enc["input_ids"][:, -max_prompt_length:], enc["attention_mask"][:, -max_prompt_length:]
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


def _pick(logits: Tensor, greedy: bool, temperature: float, top_p: float, top_k: int,
          argmax_rows: Tensor | None = None) -> Tensor:
    """Next token per row from (B, V) logits: argmax, or a sample after temperature / top-k / top-p;
    ``argmax_rows`` (B,) bool: those rows take the argmax instead of their sample."""
    if greedy:
        return logits.argmax(-1)
    if argmax_rows is not None:
        return torch.where(argmax_rows, logits.argmax(-1), _pick(logits, False, temperature, top_p, top_k))
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return draw(logits.softmax(-1))


def draw(probs: Tensor) -> Tensor:
    """One token per row of (B, V) probabilities -> (B,), by inverse-CDF sampling: one
    ``torch.rand`` uniform per row from the device's generator (``torch.multinomial`` draws an
    exponential per vocabulary entry, many times the work for a 50k-entry vocabulary)."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _cpu_decoding(lm, rows: int, cpu_layer: bool):
    """(a context under which each linear layer runs the faster of two GEMMs, a function making the
    few-op Llama decoder for a cache or None) of pg_lm/lm/cpu for ``rows`` decoding rows; without
    the CPU layer, (a null context, None): the model's own forward decodes."""
    if not cpu_layer:
        return nullcontext(), None
    from .cpu.decode_gemm import decode_gemms
    from .cpu.decode_llama import LlamaDecoder, fused_projections, supports

    if not supports(lm):
        return decode_gemms(lm, rows, skip=[]), None
    projections, fused = fused_projections(lm, rows)
    return decode_gemms(lm, rows, skip=fused), lambda cache, am, T: LlamaDecoder(lm, cache, am, T, projections)


@torch.no_grad()
def generate(lm, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, max_new_tokens: int,
             eos_ids: list[int], pad_id: int, greedy: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, cpu_layer: bool = False, logprobs: bool = False,
             greedy_extra: bool = False):
    """Decode ``num_samples`` completions for each of N prompts -> (N * G, <= max_new_tokens) ids
    (with ``logprobs``: and the (N * G, T) fp32 log-prob of each drawn token under the sampler's
    logits, ``log softmax(logits / temperature)`` before top-k / top-p, as the learner computes it).
    ``lm``: a causal LM, or an inference engine in its place (:mod:`pg_lm.lm.engine`).

    Each prompt is encoded once by the model's forward; its KV cache is repeated for its G
    samples, and each step is one forward of the new tokens on that cache (device-agnostic: the
    model's own attention, SDPA / flash attention on a GPU). Rows that have emitted EOS are filled
    with ``pad_id``; decoding stops when every row has. ``cpu_layer``: on a CPU, each linear layer
    runs the faster of two GEMMs (``cpu.decode_gemm``) and a Llama decodes in fewer ops with a
    preallocated cache (``cpu.decode_llama``); the same tokens. ``greedy_extra`` (ReMax): each
    prompt gets one more row after its ``num_samples`` sampled ones, decoded greedily in the same
    loop (N * (G + 1) rows; its draw is made and discarded, so the random stream is a function of
    the step alone)."""
    from .engine import VLLMEngine
    from .policy import kv_cache, positions
    if isinstance(lm, VLLMEngine):  # --generator vllm: the same ids in, the same ids (and log-probs) out
        return lm.generate(prompt_ids, prompt_mask, num_samples, max_new_tokens, eos_ids, pad_id, greedy, temperature,
                           top_p, top_k, cpu_layer, logprobs, greedy_extra)
    per = num_samples + int(greedy_extra)  # rows per prompt
    rows = prompt_ids.shape[0] * per
    argmax_rows = (torch.arange(rows, device=prompt_ids.device) % per == per - 1) if greedy_extra else None  # (B,)
    gemms, make_decoder = _cpu_decoding(lm, rows, cpu_layer)
    with gemms:
        pos = positions(prompt_mask)  # (N, P)
        out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                 logits_to_keep=1)
        kw, cache = kv_cache(out)
        cache.batch_repeat_interleave(per)
        logits = out.logits[:, -1].repeat_interleave(per, 0)  # (B, V)
        am = prompt_mask.repeat_interleave(per, 0)  # (B, P + t)
        next_pos = pos[:, -1:].repeat_interleave(per, 0) + 1  # (B, 1)
        eos = torch.tensor(eos_ids, device=prompt_ids.device)
        done = torch.zeros(am.shape[0], dtype=torch.bool, device=am.device)
        decoder = make_decoder(cache, am, max_new_tokens) if make_decoder else None
        tokens, logps = [], []
        for t in range(max_new_tokens):
            tok = _pick(logits, greedy, temperature, top_p, top_k, argmax_rows).masked_fill(done, pad_id)  # (B,)
            tokens.append(tok)
            if logprobs:
                lsm = torch.log_softmax(logits.float() / temperature, -1)  # (B, V)
                logps.append(lsm.gather(-1, tok[:, None]).squeeze(-1))  # (B,)
            done = done | torch.isin(tok, eos)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if decoder is not None:
                logits = decoder.step(tok, next_pos)  # (B, V)
            else:
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                out = lm(input_ids=tok[:, None], attention_mask=am, position_ids=next_pos, use_cache=True,
                         **{kw: cache})
                logits = out.logits[:, -1]
            next_pos = next_pos + 1
        if logprobs:
            return torch.stack(tokens, 1), torch.stack(logps, 1)  # (B, T), (B, T)
        return torch.stack(tokens, 1)  # (B, T)


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
    cpu_layer: bool = False,
    truncate_prompts: bool = False,
    system_prompt: str | None = None,
    logprobs: bool = False,
    greedy_extra: bool = False,
) -> Rollout:
    """Sample ``num_samples`` completions per prompt. ``lm`` is the unwrapped causal LM with its
    full weights; ``cpu_layer``: decode with pg_lm/lm/cpu (:func:`generate`); ``truncate_prompts``:
    a prompt over ``max_prompt_length`` keeps its last tokens (else it is an error); prompts and
    ``system_prompt`` as :func:`format_prompts` reads them; ``logprobs``: record the sampler's
    log-probs (``Rollout.sampler_logp``); ``greedy_extra`` (ReMax): one more completion per prompt,
    decoded greedily, after its ``num_samples`` sampled ones (groups of G + 1 rows, the greedy one
    last; :func:`split_greedy` separates them)."""
    device = lm.device
    ids, am = encode_prompts(tokenizer, prompts, chat_template, max_prompt_length, truncate_prompts, system_prompt)
    ids, am = ids.to(device), am.to(device)  # (N, P)
    eos = eos_token_ids(tokenizer, lm)
    out = generate(lm, ids, am, num_samples, max_new_tokens, eos, tokenizer.pad_token_id, greedy,
                   temperature, top_p, top_k, cpu_layer, logprobs, greedy_extra)
    num_samples += int(greedy_extra)  # rows per prompt
    comp, lp = out if logprobs else (out, None)  # (B, T), (B, T) or None
    mask, truncated = completion_mask_from_ids(comp, eos)
    T = max(int(mask.sum(1).max()), 1)  # trim columns that are padding in every row
    comp, mask = comp[:, :T], mask[:, :T]
    lp = torch.where(mask.bool(), lp[:, :T], 0.0) if lp is not None else None
    lengths = mask.sum(1).long().tolist()
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(comp.tolist(), lengths)]
    rep = lambda xs: [x for x in xs for _ in range(num_samples)]
    return Rollout(
        prompt_ids=ids.repeat_interleave(num_samples, 0), prompt_mask=am.repeat_interleave(num_samples, 0),
        completion_ids=comp, completion_mask=mask, truncated=truncated,
        prompts=rep(prompts), completions=texts, columns={k: rep(v) for k, v in columns.items()},
        sampler_logp=lp, group_size=num_samples,
    )
