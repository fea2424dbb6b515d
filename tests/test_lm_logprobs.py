"""pg_lm/lm/logprobs.py: the chunked log-prob / entropy function against the plain torch ops
(log_softmax + gather, and core.entropy_from_logits), in value and in gradient."""

from __future__ import annotations

import pytest
import torch

from pg_lm.core import entropy_from_logits
from pg_lm.lm import logprobs as lp


def _reference(logits, tokens, temperature):
    x = logits.float() / temperature
    logp = torch.log_softmax(x, -1).gather(-1, tokens[..., None])[..., 0]
    return logp, entropy_from_logits(x)


def _case(dtype, seed=0, shape=(3, 5, 37)):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, generator=g)).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    w_logp, w_ent = torch.randn(shape[:-1], generator=g), torch.randn(shape[:-1], generator=g)
    return logits, tokens, w_logp, w_ent


@pytest.mark.parametrize("chunk", [1, 4 * 37, 1 << 20], ids=["row-by-row", "4-rows", "one-chunk"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_values_and_gradients_match_the_plain_ops(chunk, temperature, with_entropy_grad, monkeypatch):
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", chunk)
    logits, tokens, w_logp, w_ent = _case(torch.float64)
    got_in, want_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp, ent = lp.token_logprobs_entropy(got_in, tokens, temperature)
    r_logp, r_ent = _reference(want_in.double(), tokens, temperature)
    r_logp, r_ent = r_logp.double(), r_ent.double()
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == tokens.shape
    torch.testing.assert_close(logp.double(), r_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, rtol=1e-5, atol=1e-5)
    loss = (w_logp * logp).sum() + ((w_ent * ent).sum() if with_entropy_grad else 0)
    r_loss = (w_logp * r_logp).sum() + ((w_ent * r_ent).sum() if with_entropy_grad else 0)
    loss.backward()
    r_loss.backward()
    assert got_in.grad.dtype == logits.dtype
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=1e-5, atol=1e-6)


def test_entropy_alone_has_the_entropy_gradient():
    logits, tokens, _, w_ent = _case(torch.float32, seed=3)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (w_ent * lp.token_logprobs_entropy(a, tokens)[1]).sum().backward()
    (w_ent * entropy_from_logits(b)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_get_a_bf16_gradient_computed_in_fp32():
    """As autocast's head output: the gradient is the fp32 one rounded once to bf16."""
    logits, tokens, w_logp, _ = _case(torch.bfloat16, seed=1, shape=(2, 4, 300))
    a = logits.clone().requires_grad_()
    (w_logp * lp.token_logprobs_entropy(a, tokens)[0]).sum().backward()
    b = logits.float().requires_grad_()
    (w_logp * _reference(b, tokens, 1.0)[0]).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad, b.grad.bfloat16(), rtol=0, atol=0)


def test_masked_logits_count_as_probability_zero():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [1.0, float("-inf"), float("-inf")]], requires_grad=True)
    tokens = torch.tensor([0, 0])
    logp, ent = lp.token_logprobs_entropy(logits, tokens)
    torch.testing.assert_close(logp, torch.tensor([-0.6931472, 0.0]))
    torch.testing.assert_close(ent, torch.tensor([0.6931472, 0.0]))
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 2] == 0).all()


def test_the_input_is_left_unchanged_and_a_strided_view_works():
    full = torch.randn(2, 6, 11)
    view = full[:, 1:-1]  # as Policy slices the logits of the unshared path
    before = full.clone()
    tokens = torch.randint(0, 11, (2, 4))
    logp, _ = lp.token_logprobs_entropy(view, tokens)
    assert torch.equal(full, before)
    torch.testing.assert_close(logp, _reference(view, tokens, 1.0)[0])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="disagree"):
        lp.token_logprobs_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_without_the_entropy_the_log_probs_and_their_gradient_are_the_same():
    logits = torch.randn(3, 5, 40, dtype=torch.float64)
    tokens = torch.randint(0, 40, (3, 5))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp, ent = lp.token_logprobs_entropy(a, tokens, 0.7)
    logp_only, none = lp.token_logprobs_entropy(b, tokens, 0.7, entropy=False)
    assert none is None and ent is not None
    assert torch.equal(logp, logp_only)
    w = torch.randn(3, 5, dtype=torch.float64)
    (w * logp).sum().backward()
    (w * logp_only).sum().backward()
    assert torch.equal(a.grad, b.grad)
