"""pg_lm/lm/cpu/decode_llama.py: the few-op Llama decode step against transformers' own forward --
the same logits at every step under left padding, the same greedy and sampled tokens, with LoRA,
with a scaled RoPE and in bf16; other architectures are left to their own forward."""

from __future__ import annotations

import pytest
import torch

from pg_lm.lm.cpu.decode_llama import LlamaDecoder, fused_projections, supports
from pg_lm.lm.policy import kv_cache, load_policy, positions
from pg_lm.lm.sampling import encode_prompts, generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is 1 + 1?", "hi", "abcdefghijklmnopqrstuvwxyz"]  # lengths differ: left padding


def _lm(path, lora=False, rope=None, dtype=torch.float32):
    policy, tok = load_policy(str(path), lora_r=4 if lora else 0)
    lm = policy.lm
    if lora:  # non-zero B matrices, so the adapter changes the logits
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    if rope is not None:  # a scaled RoPE: the decoder must use the model's rotary module, not its own
        from transformers import LlamaForCausalLM

        cfg = lm.config
        if not isinstance(getattr(cfg, "rope_parameters", None), dict):
            pytest.skip("this transformers names RoPE scaling otherwise")
        cfg.rope_parameters = {**cfg.rope_parameters, **rope}
        scaled = LlamaForCausalLM(cfg)
        scaled.load_state_dict(lm.state_dict())
        lm = scaled
    return lm.to(dtype).eval(), tok


def _step_logits(lm, tok, G, steps, fast, fuse=True):
    """Logits (steps, B, V) of decoding a fixed token sequence after the prompts, one way or the other
    (``fuse``: the decoder's q|k|v and gate|up GEMMs where the layers allow it, as ``generate`` does)."""
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    pos = positions(am)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True, logits_to_keep=1)
        kw, cache = kv_cache(out)
        cache.batch_repeat_interleave(G)
        am = am.repeat_interleave(G, 0)
        next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
        feed = torch.randint(4, len(tok), (steps, am.shape[0]), generator=torch.Generator().manual_seed(0))
        projections = fused_projections(lm, am.shape[0])[0] if fuse else None
        decoder = LlamaDecoder(lm, cache, am, steps, projections) if fast else None
        got = []
        for t in range(steps):
            if fast:
                got.append(decoder.step(feed[t], next_pos))
            else:
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                got.append(lm(input_ids=feed[t][:, None], attention_mask=am, position_ids=next_pos,
                              use_cache=True, **{kw: cache}).logits[:, -1])
            next_pos = next_pos + 1
    return torch.stack(got).float()


@pytest.mark.parametrize("variant", ["plain", "lora", "rope-linear-x2"])
def test_step_logits_match_the_models_forward(tiny_lm_dir, variant):
    lm, tok = _lm(tiny_lm_dir, lora=variant == "lora",
                  rope={"rope_type": "linear", "factor": 2.0} if variant.startswith("rope") else None)
    assert supports(lm)
    want = _step_logits(lm, tok, G=2, steps=6, fast=False)
    for fuse in (True, False):
        got = _step_logits(lm, tok, G=2, steps=6, fast=True, fuse=fuse)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_projections_are_fused_only_where_the_layers_are_plain_linears(tiny_lm_dir, lora):
    lm, _ = _lm(tiny_lm_dir, lora=lora)
    plans, fused = fused_projections(lm, 4)
    n_layers = lm.config.num_hidden_layers
    assert len(plans) == n_layers
    if lora:  # PEFT wraps each projection: the decoder calls the modules (and their adapters)
        assert plans == [(None, None)] * n_layers and fused == []
    else:
        assert all(qkv is not None and gu is not None for qkv, gu in plans) and len(fused) == 5 * n_layers
        layer = lm.model.layers[0]
        h = torch.randn(4, 1, lm.config.hidden_size)
        a, m = layer.self_attn, layer.mlp
        with torch.no_grad():
            torch.testing.assert_close(plans[0][0](h), torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], -1))
            torch.testing.assert_close(plans[0][1](h), torch.cat([m.gate_proj(h), m.up_proj(h)], -1))


def test_bf16_step_logits_are_within_a_rounding_of_the_models(tiny_lm_dir):
    """torch.rms_norm rounds to bf16 once; the model's RMSNorm rounds, then multiplies by its weight."""
    lm, tok = _lm(tiny_lm_dir, dtype=torch.bfloat16)
    want = _step_logits(lm, tok, G=2, steps=6, fast=False)
    got = _step_logits(lm, tok, G=2, steps=6, fast=True)
    torch.testing.assert_close(_step_logits(lm, tok, G=2, steps=6, fast=True, fuse=False), got, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_gives_the_same_tokens_either_way(tiny_lm_dir, greedy):
    lm, tok = _lm(tiny_lm_dir)
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    outs = []
    for fast in (True, False):
        torch.manual_seed(3)  # sampling draws the same uniforms in both
        outs.append(generate(lm, ids, am, 3, 12, [tok.eos_token_id], tok.pad_token_id, greedy=greedy,
                             cpu_layer=fast))
    assert outs[0].shape[0] == 9 and torch.equal(outs[0], outs[1])


def test_other_architectures_decode_through_their_own_forward(tiny_gpt2_dir, monkeypatch):
    policy, tok = load_policy(str(tiny_gpt2_dir))
    assert not supports(policy.lm)
    made = []
    monkeypatch.setattr(LlamaDecoder, "__init__", lambda self, *a: made.append(1))
    ids, am = encode_prompts(tok, PROMPTS, True, None)
    out = generate(policy.lm.eval(), ids, am, 2, 5, [tok.eos_token_id], tok.pad_token_id, cpu_layer=True)
    assert out.shape[0] == 6 and not made
