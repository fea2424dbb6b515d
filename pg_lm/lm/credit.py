"""The per-token record behind ``pg-lm view``: for the completions a run logs, what each token got.

Every ``--samples-every`` steps the trainer appends one row per completion to
``samples_tokens.jsonl``: the prompt, the completion, its reward, its group (the G samples of one
prompt), and per token its text, advantage, log-prob, and, when they exist, its KL to the
reference and the critic's value. Only logged steps are kept, with 4 decimals, so the file stays
small; :mod:`pg_lm.run.view` renders it as an HTML page.
"""

from __future__ import annotations

import math

from torch import Tensor

from pg_lm.core import kl_estimate
from pg_lm.run.view import FILE  # noqa: F401  (the trainer writes what the view reads)


def token_texts(tok, ids: list[int], context: int = 4) -> list[str]:
    """The text each token of ``ids`` adds to the decoded completion, special tokens kept.

    Each piece is the difference between two decodings that end before and after the token, both
    starting ``context`` tokens earlier, so a leading space (SentencePiece's ``▁``) is kept, at a
    cost linear in the length. A token that ends in the middle of a UTF-8 character adds "", and
    the character shows on the token that completes it.
    """
    def decode(x):
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, start = [], 0  # ids[:start] are shown in full
    for k in range(len(ids)):
        first = max(0, start - context)
        before, after = decode(ids[first:start]), decode(ids[first:k + 1])
        if after.endswith("\ufffd") and k < len(ids) - 1:  # an unfinished character: wait for the next token
            out.append("")
            continue
        out.append(after[len(before):] if after.startswith(before) else decode(ids[start:k + 1]))
        start = k + 1
    return out


def _numbers(x: Tensor, n: int) -> list:
    """The first ``n`` entries of the row ``x`` (T,) rounded to 4 decimals; NaN / inf as None."""
    return [round(v, 4) if math.isfinite(v) else None for v in x[:n].float().tolist()]


def token_rows(batch, adv: Tensor, tok, step: int, group_size: int, kl_estimator: str = "k3") -> list[dict]:
    """One ``samples_tokens.jsonl`` row per completion of the scored rollout ``batch``.

    ``adv`` (B, T) are the advantages trained on. The log-prob is the learner's π_old when the
    trainer computed it, else the sampler's; the KL is ``kl_estimator`` between those log-probs and
    the reference's (present only when the run has a reference); the value is V(s_t) before each
    token (present only with a value head). Rows i·G .. i·G+G-1 are group i.
    """
    n_tok = batch.attention.sum(1).long().tolist()  # (B,) every real token (an episode's observations too)
    ids = batch.completion_ids.tolist()
    logp = batch.logp if batch.logp is not None else batch.sampler_logp  # (B, T) or None
    kl = None
    if batch.ref_logp is not None and batch.logp is not None:
        kl = kl_estimate(batch.logp, batch.ref_logp, kl_estimator) * batch.completion_mask  # (B, T)
    rows = []
    for i, n in enumerate(n_tok):
        row = {"step": step, "group": i // group_size, "prompt": batch.prompts[i], "completion": batch.completions[i],
               "reward": float(batch.scores[i]), "tokens": token_texts(tok, ids[i][:n])}
        for name, x in (("advantage", adv), ("logp", logp), ("kl", kl), ("value", batch.values)):
            if x is not None:
                row[name] = _numbers(x[i], n)
        if batch.completion_attention is not None:  # an episode: which tokens the policy sampled
            row["action"] = [int(a) for a in batch.completion_mask[i, :n].tolist()]
        rows.append(row)
    return rows
