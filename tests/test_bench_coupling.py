"""The common random numbers of ``benchmarks/lm_reward_per_step.py --coupled``.

Coupled, pg_lm's sampler draws each token with ``torch.multinomial`` (``draw_by_multinomial``)
from the seed TRL's ``model.generate`` starts from. Then, given the same weights, the two
must pick the same tokens: this checks it token for token against ``model.generate`` itself
on the tiny models (left padding, groups of samples sharing a prompt's cache, rows that stop).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pg_lm.lm.policy import load_policy
from pg_lm.lm.sampling import encode_prompts, eos_token_ids, sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
_lm_setup = pytest.importorskip("_lm_setup")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is 1 + 1?", "hi", "abcdefghijklmnopqrstuvwxyz", "7"]
G, NEW = 4, 12


def _generate_rows(lm, tok, seed: int) -> list[list[int]]:
    """``model.generate`` at temperature 1, no top-k / top-p, on each prompt repeated G times
    (TRL's layout), from ``torch.manual_seed(seed)``; each row through its first EOS."""
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    ids, am = ids.repeat_interleave(G, 0), am.repeat_interleave(G, 0)
    eos = eos_token_ids(tok, lm)
    torch.manual_seed(seed)
    out = lm.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      max_new_tokens=NEW, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:n])
    return rows


def _sample_rows(lm, tok, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    r = sample(lm, tok, PROMPTS, {}, num_samples=G, max_new_tokens=NEW)
    return [row[:n] for row, n in zip(r.completion_ids.tolist(), r.lengths.tolist())]


@pytest.mark.parametrize("model", ["tiny_lm_dir", "tiny_gpt2_dir"])
def test_coupled_pg_lm_sampler_picks_the_tokens_generate_picks(model, request, monkeypatch):
    lm, tok = load_policy(request.getfixturevalue(model))
    lm = lm.lm.eval()
    seed = 3
    want = _generate_rows(lm, tok, seed)
    assert any(len(w) < NEW for w in want) and any(len(w) == NEW for w in want)  # rows stopped, rows ran on
    assert len({tuple(w) for w in want}) == len(want)  # samples, not one repeated row

    own = _sample_rows(lm, tok, seed)  # pg_lm's own inverse-CDF draw: same distribution, other tokens
    assert own != want

    import pg_lm.lm.sampling as sampling

    monkeypatch.setattr(sampling, "draw", _lm_setup.draw_by_multinomial)
    assert _sample_rows(lm, tok, seed) == want
