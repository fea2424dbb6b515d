"""Sampling and log-probs: masks come from the first EOS (never from the pad id), the
policy's log-probs equal a plain full-sequence reference at completion positions only,
and greedy sampling with left-padded prompts matches an unpadded greedy loop."""

from __future__ import annotations

import pytest
import torch

from pg_lm.lm.policy import Policy, load_policy
from pg_lm.lm.rollout import Rollout
from pg_lm.lm.sampling import completion_mask_from_ids, encode_prompts, sample

pytestmark = pytest.mark.usefixtures("one_thread")  # see lm_fixtures.one_thread

PROMPTS = ["What is 1 + 1?", "hi", "abcdefghijklmnopqrstuvwxyz", "7"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def policy_tok(request):
    """The tiny Llama (rotary, relative positions) and the tiny GPT-2 (absolute positions)."""
    path = request.getfixturevalue("tiny_lm_dir" if request.param == "llama" else "tiny_gpt2_dir")
    policy, tok = load_policy(path, value_head=True)
    return policy.eval(), tok


# ---------------------------------------------------------------- masks from lengths


def test_mask_from_first_eos_when_pad_equals_eos():
    eos = 2  # pad == eos: the padding after the first EOS looks exactly like more EOS tokens
    ids = torch.tensor([
        [5, 6, 2, 2, 2],  # EOS at 2: keep it, mask what follows
        [2, 2, 2, 2, 2],  # EOS first: a one-token completion (stopping is an action)
        [5, 6, 7, 8, 9],  # no EOS: truncated, full mask
        [5, 2, 7, 2, 9],  # tokens after the first EOS never count, even non-pad ones
        [5, 6, 7, 8, 2],  # EOS on the last column: not truncated
    ])
    mask, truncated = completion_mask_from_ids(ids, [eos])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert mask.dtype.is_floating_point
    assert mask.tolist() == want.float().tolist()
    assert truncated.tolist() == [False, False, True, False, False]


def test_mask_with_several_eos_ids():
    ids = torch.tensor([[4, 9, 3, 3], [4, 3, 9, 0], [4, 4, 4, 4]])
    mask, truncated = completion_mask_from_ids(ids, [9, 3])  # e.g. <|im_end|> and <|endoftext|>
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_sampled_masks_with_pad_equal_to_eos(tiny_lm_dir):
    """End to end through ``sample``: pad == EOS, and a model that often stops."""
    policy, tok = load_policy(tiny_lm_dir)
    tok.pad_token = tok.eos_token
    lm = policy.lm
    lm.generation_config.pad_token_id = tok.eos_token_id
    eos = tok.eos_token_id
    boost = torch.zeros(len(tok))
    boost[eos] = 3.0  # p(EOS) ~ 17% per token
    hook = lm.lm_head.register_forward_hook(lambda m, i, out: out + boost)
    try:
        torch.manual_seed(0)
        r = sample(lm, tok, PROMPTS, {"answer": ["a", "b", "c", "d"]}, num_samples=4, max_new_tokens=8)
    finally:
        hook.remove()
    B, T = r.completion_ids.shape
    assert B == 16 and T <= 8
    lengths = r.completion_mask.sum(1).long()
    assert r.lengths.tolist() == lengths.tolist()
    for i in range(B):
        n, ids = int(lengths[i]), r.completion_ids[i].tolist()
        assert r.completion_mask[i].tolist() == [1.0] * n + [0.0] * (T - n)  # a prefix of ones
        assert eos not in ids[: n - 1]
        if r.truncated[i]:
            assert n == 8 and ids[n - 1] != eos
        else:
            assert ids[n - 1] == eos
        assert ids[n:] == [tok.pad_token_id] * (T - n)
        assert r.completions[i] == tok.decode(ids[:n], skip_special_tokens=True)
    # both kinds of ending occurred, with different lengths (the test exercised something)
    assert r.truncated.any() and (~r.truncated).any()
    assert len(set(lengths.tolist())) >= 3
    # samples of a prompt are contiguous, columns follow them
    assert r.prompts == [p for p in PROMPTS for _ in range(4)]
    assert r.columns == {"answer": [a for a in "abcd" for _ in range(4)]}


# ---------------------------------------------------------------- log-probs at completion positions only


def _batch(tok, prompts, completions: list[list[int]]):
    ids, am = encode_prompts(tok, prompts, chat_template=True, max_prompt_length=None)
    T = max(map(len, completions))
    comp = torch.full((len(prompts), T), tok.pad_token_id)
    for i, c in enumerate(completions):
        comp[i, : len(c)] = torch.tensor(c)
    mask = (comp != -1).float() * (torch.arange(T)[None] < torch.tensor([len(c) for c in completions])[:, None])
    return Rollout(prompt_ids=ids, prompt_mask=am, completion_ids=comp, completion_mask=mask,
                   truncated=torch.zeros(len(prompts), dtype=torch.bool), prompts=prompts, completions=[""] * len(prompts))


def _reference(lm, tok, prompt_ids, prompt_mask, completion, temperature):
    """log_softmax over every position of the unpadded sequence, gathered at the completion tokens."""
    real = prompt_ids[prompt_mask.bool()].tolist()
    full = torch.tensor([real + completion])
    with torch.no_grad():
        logits = lm(input_ids=full).logits[0].float() / temperature  # (P + T, V): no padding at all
    logp = torch.log_softmax(logits, -1)
    P = len(real)
    pos = torch.arange(P - 1, P - 1 + len(completion))
    lp = logp[pos, torch.tensor(completion)]
    ent = -(logp.exp() * logp).sum(-1)[pos]
    return lp, ent


def _forward(policy, batch, group_size=1, **kw):
    return policy(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                  group_size=group_size, **kw)


def _random_completions(tok, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    comps = [torch.randint(4, len(tok), (n,), generator=g).tolist() for n in lengths]
    comps[1][-1] = tok.eos_token_id  # a completion that stopped
    return comps


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_policy_logp_equals_a_full_forward_reference(policy_tok, temperature):
    policy, tok = policy_tok
    comps = _random_completions(tok, (5, 2, 7, 1))
    batch = _batch(tok, PROMPTS, comps)
    assert (batch.prompt_mask == 0).any(1).sum() == 3  # prompts of different lengths: real left padding

    seen = []  # the vocabulary projection runs on T + 1 positions, not on the prompt
    hook = policy.lm.lm_head.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            logp, values, ent = _forward(policy, batch, temperature=temperature, with_entropy=True)
    finally:
        hook.remove()
    B, T = batch.completion_ids.shape
    assert seen == [(B, T + 1, len(tok))]
    assert logp.shape == values.shape == ent.shape == (B, T)
    assert logp.dtype == torch.float32
    for i, c in enumerate(comps):
        want_lp, want_ent = _reference(policy.lm, tok, batch.prompt_ids[i], batch.prompt_mask[i], c, temperature)
        torch.testing.assert_close(logp[i, : len(c)], want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, : len(c)], want_ent, atol=1e-5, rtol=1e-5)
    assert (values == 0).all()  # the value head starts at zero


def test_shared_prompt_forward_matches_reference_and_gradients(policy_tok):
    """group_size G > 1 runs each prompt once and shares its KV cache: same log-probs, values and
    gradients as running every row in full (G = 1), and as the unpadded reference."""
    policy, tok = policy_tok
    G = 3
    prompts = [p for p in PROMPTS[:3] for _ in range(G)]
    comps = _random_completions(tok, (4, 1, 6, 2, 5, 3, 1, 6, 2), seed=3)
    batch = _batch(tok, prompts, comps)
    with torch.no_grad():  # a non-zero value head, so that its gradient and values mean something
        policy.value_head.weight.normal_(generator=torch.Generator().manual_seed(0))
    try:
        results = []
        for g in (1, G):
            policy.zero_grad(set_to_none=True)
            logp, values, ent = _forward(policy, batch, group_size=g, temperature=0.9, with_entropy=True)
            m = batch.completion_mask
            ((logp * m).sum() + (values * m).sum() + 0.1 * (ent * m).sum()).backward()
            grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
            results.append((logp.detach() * m, values.detach() * m, ent.detach() * m, grads))
    finally:
        with torch.no_grad():
            policy.value_head.weight.zero_()
        policy.zero_grad(set_to_none=True)
    (lp1, v1, e1, g1), (lpG, vG, eG, gG) = results
    torch.testing.assert_close(lpG, lp1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vG, v1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eG, e1, atol=1e-5, rtol=1e-5)
    assert g1.keys() == gG.keys() and len(g1) == len(list(policy.parameters()))
    for n in g1:
        torch.testing.assert_close(gG[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)
    for i, c in enumerate(comps):
        want, _ = _reference(policy.lm, tok, batch.prompt_ids[i], batch.prompt_mask[i], c, 0.9)
        torch.testing.assert_close(lpG[i, : len(c)], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len, lengths", [(1, (3, 1, 2, 3)), (5, (1, 1, 1, 1))])
def test_shared_prompt_forward_edge_shapes(policy_tok, prompt_len, lengths):
    """One-token prompts (nothing to cache: rows run in full) and one-token completions
    (the second call is the prompt's last token alone) give the plain forward's numbers."""
    policy, tok = policy_tok
    G = 2
    g = torch.Generator().manual_seed(7)
    p_ids = torch.randint(4, len(tok), (2, prompt_len), generator=g).repeat_interleave(G, 0)  # (4, P), no padding
    comps = _random_completions(tok, lengths, seed=5)
    T = max(lengths)
    comp = torch.full((4, T), tok.pad_token_id)
    for i, c in enumerate(comps):
        comp[i, : len(c)] = torch.tensor(c)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    args = (p_ids, torch.ones_like(p_ids), comp, mask)
    with torch.no_grad():
        ref = policy(*args, group_size=1, with_entropy=True)
        got = policy(*args, group_size=G, with_entropy=True)
    for r, x in zip(ref, got):
        torch.testing.assert_close(x * mask, r * mask, atol=1e-5, rtol=1e-5)


def _greedy_unpadded(lm, tok, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(lm(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return out


def test_greedy_sampling_is_argmax_with_left_padding(policy_tok):
    policy, tok = policy_tok
    lm = policy.lm
    eos = tok.eos_token_id
    # an EOS boost so that some rows stop early (trimming and padding paths) and others do not
    for b in (0.6, 0.4, 0.2, 0.1, 0.0):
        boost = torch.zeros(len(tok))
        boost[eos] = b
        hook = lm.lm_head.register_forward_hook(lambda m, i, out: out + boost)
        try:
            want = [_greedy_unpadded(lm, tok, p, 6) for p in PROMPTS]
            if any(len(w) > 1 for w in want) and any(eos in w for w in want):
                break
        finally:
            hook.remove()
    assert any(len(w) > 1 for w in want)
    hook = lm.lm_head.register_forward_hook(lambda m, i, out: out + boost)
    try:
        r = sample(lm, tok, PROMPTS, {}, num_samples=2, max_new_tokens=6, greedy=True)
    finally:
        hook.remove()
    got = [r.completion_ids[i, : int(n)].tolist() for i, n in enumerate(r.lengths)]
    assert got == [w for w in want for _ in range(2)]  # greedy: both samples of a prompt agree
    assert r.truncated.tolist() == [eos not in w for w in want for _ in range(2)]
    assert r.completions == [tok.decode(w, skip_special_tokens=True) for w in want for _ in range(2)]


def test_prompt_over_the_limit_is_an_error_naming_it(policy_tok):
    _, tok = policy_tok
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens, over --max-prompt-length 10"):
        encode_prompts(tok, ["hi", "a prompt that is far too long"], chat_template=True, max_prompt_length=10)


def test_policy_wraps_any_causal_lm_with_a_zero_value_head(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    p = Policy(lm, value_head=True)
    assert p.value_head.in_features == lm.config.hidden_size
    assert Policy(lm).value_head is None


# ---------------------------------------------------------------- top-k / top-p


def _ranks_and_mass(lm, tok, r):
    """For each sampled token (B rows, real positions): its rank in the policy's logits and the
    probability mass of the tokens ranked above it (teacher-forced, unpadded)."""
    out = []
    for i in range(r.completion_ids.shape[0]):
        real = r.prompt_ids[i][r.prompt_mask[i].bool()].tolist()
        comp = r.completion_ids[i, : int(r.lengths[i])].tolist()
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([real + comp])).logits[0, len(real) - 1 : -1]  # (n, V)
        probs = logits.softmax(-1)
        for t, c in enumerate(comp):
            above = probs[t] > probs[t, c]
            out.append((int(above.sum()), float(probs[t][above].sum())))
    return out


def test_top_k_and_top_p_restrict_the_sampled_tokens(policy_tok):
    policy, tok = policy_tok
    lm = policy.lm
    greedy = sample(lm, tok, PROMPTS, {}, num_samples=2, max_new_tokens=5, greedy=True)
    torch.manual_seed(0)
    top1 = sample(lm, tok, PROMPTS, {}, num_samples=2, max_new_tokens=5, top_k=1)
    assert top1.completion_ids.tolist() == greedy.completion_ids.tolist()

    torch.manual_seed(0)
    r = sample(lm, tok, PROMPTS, {}, num_samples=8, max_new_tokens=5, top_k=3)
    ranks = [rank for rank, _ in _ranks_and_mass(lm, tok, r)]
    assert max(ranks) <= 2 and len(set(ranks)) == 3  # only the top 3, and all of them get drawn

    torch.manual_seed(0)
    r = sample(lm, tok, PROMPTS, {}, num_samples=8, max_new_tokens=5, top_p=0.05)
    stats = _ranks_and_mass(lm, tok, r)
    assert all(mass < 0.05 + 1e-6 for _, mass in stats)  # the nucleus: mass above each drawn token < top_p
    assert max(rank for rank, _ in stats) >= 1  # ... but it is not greedy


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_token_frequencies_follow_the_softmax(temperature):
    """Inverse-CDF sampling draws from softmax(logits / T): a chi-square test over 200k draws."""
    from pg_lm.lm.sampling import _pick

    g = torch.Generator().manual_seed(0)
    V, n = 50, 200_000
    logits = torch.randn(1, V, generator=g) * 2
    p = (logits[0] / temperature).softmax(-1)
    torch.manual_seed(1)
    draws = _pick(logits.expand(n, V).contiguous(), False, temperature, 1.0, 0)
    f = torch.bincount(draws, minlength=V).double() / n
    chi2 = float((((f - p) ** 2) / p).sum() * n)
    assert chi2 < 95.0, chi2  # 49 degrees of freedom: P(chi2 > 95) ~ 1e-4 for a correct sampler
    wrong = (logits[0] / (temperature * 1.5)).softmax(-1)  # the test can tell a wrong temperature apart
    assert float((((f - wrong) ** 2) / wrong).sum() * n) > 1000
