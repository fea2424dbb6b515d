"""pg_lm/lm/cpu/decode_gemm.py: while sampling on a CPU the linear layers may run oneDNN's GEMM instead
of MKL's; they must give the same logits and tokens, change nothing with autograd on, and be
restored on leaving."""

from __future__ import annotations

import pytest
import torch

from pg_lm.lm.cpu import decode_gemm as dg
from pg_lm.lm.policy import load_policy
from pg_lm.lm.sampling import encode_prompts, generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is 1 + 1?", "hi", "abcdefghijklmnopqrstuvwxyz"]


@pytest.fixture(params=["llama", "gpt2", "llama-lora"])
def lm_tok(request):
    """The tiny Llama (untied head), GPT-2 (its attention and MLP are Conv1D, its head tied to the
    input embedding), and the Llama under LoRA (PEFT wraps each linear around a base layer)."""
    path = request.getfixturevalue("tiny_gpt2_dir" if request.param == "gpt2" else "tiny_lm_dir")
    policy, tok = load_policy(path, lora_r=4 if request.param.endswith("lora") else 0)
    if request.param.endswith("lora"):  # non-zero B matrices, so the adapter changes the logits
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return policy.lm.eval(), tok


def _swapped(lm):
    return [m for m in lm.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]


def test_swapped_layers_give_the_same_logits_and_greedy_tokens(lm_tok, monkeypatch):
    lm, tok = lm_tok
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: True)
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    calls = []
    real = dg._onednn_linear
    monkeypatch.setattr(dg, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    linears = [m for m in lm.modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        with dg.decode_gemms(lm, rows=len(PROMPTS)), pytest.MonkeyPatch.context() as mp:
            assert len(_swapped(lm)) == len(linears) > 0
            got = lm(input_ids=ids, attention_mask=am).logits  # (N, P, V)
            mp.setattr(dg, "onednn_is_faster", lambda *a: False)
            got_ids = generate(lm, ids, am, 2, 8, [tok.eos_token_id], tok.pad_token_id, greedy=True, cpu_layer=True)
        assert not _swapped(lm)  # every class forward back
        want = lm(input_ids=ids, attention_mask=am).logits
        monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: False)
        want_ids = generate(lm, ids, am, 2, 8, [tok.eos_token_id], tok.pad_token_id, greedy=True, cpu_layer=True)
    assert calls, "the oneDNN kernel was not used"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_ids, want_ids)


def test_generate_uses_the_probe_and_restores_the_layers(lm_tok, monkeypatch):
    lm, tok = lm_tok
    asked = []
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: asked.append(a) or True)
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    plain = generate(lm, ids, am, 2, 4, [tok.eos_token_id], tok.pad_token_id)  # the plain path: no probe
    assert plain.shape[0] == 6 and not asked
    out = generate(lm, ids, am, 2, 4, [tok.eos_token_id], tok.pad_token_id, cpu_layer=True)
    assert out.shape[0] == 6 and asked and all(rows == 6 for _, _, rows, *_ in asked)  # the decode's row count
    assert not _swapped(lm)


def test_no_swap_with_autograd_on_or_when_mkl_is_faster(lm_tok, monkeypatch):
    lm, _ = lm_tok
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: True)
    with dg.decode_gemms(lm, rows=4):  # grad enabled: training forwards keep autograd's linear
        assert not _swapped(lm)
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: False)
    with torch.no_grad(), dg.decode_gemms(lm, rows=4):
        assert not _swapped(lm)


def test_an_instance_forward_is_restored(lm_tok, monkeypatch):
    lm, _ = lm_tok
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: True)
    head = lm.get_output_embeddings()
    mine = head.forward  # a bound method set on the instance, as a hook library might
    head.forward = mine
    with torch.no_grad(), dg.decode_gemms(lm, rows=4):
        assert head.__dict__["forward"] is not mine
    assert head.__dict__["forward"] is mine


def test_the_probe_is_cached_per_shape_and_the_kernels_agree():
    dg.onednn_is_faster.cache_clear()
    first = dg.onednn_is_faster(64, 16, 4, 1)
    assert dg.onednn_is_faster(64, 16, 4, 1) is first and dg.onednn_is_faster.cache_info().hits == 1
    x, w, b = torch.randn(4, 1, 16), torch.randn(64, 16), torch.randn(64)
    if torch.backends.mkldnn.is_available():
        torch.testing.assert_close(dg._onednn_linear(x, w, b), torch.nn.functional.linear(x, w, b))


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
needs_bf16_reorder = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and dg.can_reorder(torch.bfloat16)),
    reason="this CPU cannot reorder bf16 weights for oneDNN (needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")


def test_a_cpu_that_cannot_reorder_keeps_f_linear(monkeypatch):
    """On an AVX2-only CPU torch's bf16 reorder raises: the probe must say 'no' (and decoding keep
    F.linear) rather than crash the sampler."""
    def refuse(w, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    monkeypatch.setattr(dg, "_reorder", refuse)
    for probe in (dg.can_reorder, dg.onednn_is_faster):
        probe.cache_clear()
    try:
        assert not dg.can_reorder(torch.bfloat16)
        assert not dg.onednn_is_faster(64, 32, 4, 1, torch.bfloat16)
        layer = torch.nn.Linear(32, 64).bfloat16()
        with torch.no_grad(), dg.decode_gemms(layer, rows=4):
            assert "forward" not in layer.__dict__  # not swapped
    finally:
        for probe in (dg.can_reorder, dg.onednn_is_faster):
            probe.cache_clear()  # the real answers again for later tests


@needs_bf16_reorder
def test_bf16_layers_run_on_reordered_weights_with_the_same_logits_and_tokens(lm_tok, monkeypatch):
    """The bf16 sampling copy: each linear runs oneDNN on a weight reordered into its blocked layout, once
    per block (the explicit one and generate's)."""
    from pg_lm.lm.cpu.lowp import SamplerCopy

    lm, tok = lm_tok
    lm = SamplerCopy(lm, torch.bfloat16).lm
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    reordered = []
    real = dg._reorder
    monkeypatch.setattr(dg, "_reorder", lambda w, rows: reordered.append(w) or real(w, rows))
    with torch.no_grad():
        monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: True)
        with dg.decode_gemms(lm, rows=len(PROMPTS)):
            got = lm(input_ids=ids, attention_mask=am).logits.float()
        got_ids = generate(lm, ids, am, 2, 8, [tok.eos_token_id], tok.pad_token_id, greedy=True, cpu_layer=True)
        monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: False)
        want = lm(input_ids=ids, attention_mask=am).logits.float()
        want_ids = generate(lm, ids, am, 2, 8, [tok.eos_token_id], tok.pad_token_id, greedy=True, cpu_layer=True)
    n_linear = sum(type(m) is torch.nn.Linear for m in lm.modules())
    # each weight once in each block; generate's Llama decoder reorders q|k|v and gate|up as two weights
    from pg_lm.lm.cpu.decode_llama import fused_projections, supports

    fused = len(fused_projections(lm, 6)[1]) if supports(lm) else 0
    assert len(reordered) == 2 * n_linear - fused + 2 * fused // 5 > 0
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # one bf16 rounding apart at most
    assert torch.equal(got_ids, want_ids)


@needs_bf16_reorder
@pytest.mark.parametrize("update", ["copy_", "fused-adamw"])
def test_a_weight_changed_between_blocks_is_reordered_again(monkeypatch, update):
    """SamplerCopy.refresh copies new weights in place, and a fused AdamW step changes them without
    bumping their version counter: the next decode must not use the old reordering."""
    monkeypatch.setattr(dg, "onednn_is_faster", lambda *a: True)
    layer = torch.nn.Linear(16, 32).bfloat16()
    x = torch.randn(4, 1, 16).bfloat16()
    with torch.no_grad():
        with dg.decode_gemms(layer, rows=4):
            before = layer(x)
    if update == "copy_":
        with torch.no_grad():
            layer.weight.copy_(torch.randn(32, 16))
    else:
        layer.weight.grad, layer.bias.grad = torch.ones_like(layer.weight), torch.ones_like(layer.bias)
        torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True).step()
    with torch.no_grad():
        with dg.decode_gemms(layer, rows=4):
            got = layer(x)
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(before.float(), want.float(), rtol=2e-2, atol=2e-2)  # the update changed the output
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
