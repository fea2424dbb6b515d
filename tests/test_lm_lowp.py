"""Low precision on the CPU (pg_lm/lm/cpu/lowp.py): the grouped attention kernel gives SDPA's numbers
(forward, gradients, sampling), the sampling copy is the learner's weights in bf16 after every
update, and ``auto`` picks bf16 / the kernel as documented."""

from __future__ import annotations

import json

import pytest
import torch

from lm_fixtures import PROMPTS as TRAIN_PROMPTS
from lm_fixtures import make_trainer, prompt_dataset, snapshot
from pg_lm.lm import setup
from pg_lm.lm.cpu import lowp
from pg_lm.lm.policy import load_policy
from pg_lm.lm.sampling import encode_prompts, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.fresh_accelerator resets Accelerate per test

PROMPTS = ["What is 1 + 1?", "hi", "abcdefghijklmnopqrstuvwxyz", "7"]  # different lengths: left padding


@pytest.fixture(params=["llama", "gpt2"])
def model_dir(request):
    """The tiny Llama (grouped-query attention: 4 query heads over 2 K/V heads) and GPT-2 (tied, MHA)."""
    return request.getfixturevalue("tiny_lm_dir" if request.param == "llama" else "tiny_gpt2_dir")


def _batch(tok, G=3, T=7, seed=0):
    ids, am = encode_prompts(tok, PROMPTS[:3], True, None)
    ids, am = ids.repeat_interleave(G, 0), am.repeat_interleave(G, 0)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(4, len(tok), (ids.shape[0], T), generator=g)
    lengths = torch.randint(1, T + 1, (ids.shape[0],), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return ids, am, comp, mask


@pytest.mark.parametrize("group_size", [1, 3])
def test_grouped_attention_matches_sdpa_forward_and_gradients(model_dir, group_size):
    """The same log-probs and parameter gradients as the model's SDPA, in fp32, with left padding,
    on full rows (group_size 1) and on the shared-prompt path (KV cache with gradient, group_size 3)."""
    results = []
    for grouped in (False, True):
        policy, tok = load_policy(model_dir)
        assert policy.lm.config._attn_implementation == "sdpa"
        if grouped:
            assert lowp.use_grouped_attention(policy.lm)
            assert policy.lm.config._attn_implementation == lowp.ATTENTION_NAME
        ids, am, comp, mask = _batch(tok)
        logp, _, _ = policy(ids, am, comp, mask, group_size=group_size)
        (logp * mask).sum().backward()
        results.append((logp.detach() * mask, {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (lp_sdpa, g_sdpa), (lp_grouped, g_grouped) = results
    torch.testing.assert_close(lp_grouped, lp_sdpa, atol=1e-5, rtol=1e-5)
    for n in g_sdpa:
        torch.testing.assert_close(g_grouped[n], g_sdpa[n], atol=1e-5, rtol=1e-4, msg=n)


def test_grouped_attention_decodes_what_sdpa_decodes(model_dir):
    """Greedy decoding from left-padded prompts with a KV cache (one-token queries): the same tokens."""
    outs = []
    for grouped in (False, True):
        policy, tok = load_policy(model_dir)
        if grouped:
            lowp.use_grouped_attention(policy.lm)
        ids, am = encode_prompts(tok, PROMPTS, True, None)
        outs.append(generate(policy.lm, ids, am, 2, 12, [tok.eos_token_id], tok.pad_token_id, greedy=True))
    assert torch.equal(outs[0], outs[1])


def test_grouped_attention_against_a_plain_loop():
    """Each (row, head, query) by hand: softmax over the keys it may see, K/V head h // G; a boolean
    mask, an additive mask and None (causal) agree with it."""
    g = torch.Generator().manual_seed(0)
    B, H, KV, Tq, L, D = 2, 6, 2, 3, 5, 4
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, Tq), (KV, L), (KV, L)))
    allowed = torch.ones(B, 1, Tq, L, dtype=torch.bool).tril(L - Tq)
    allowed[0, :, :, 0] = False  # row 0: its first key is left padding
    want = torch.zeros(B, Tq, H, D)
    for b in range(B):
        for h in range(H):
            for t in range(Tq):
                keep = allowed[b, 0, t]
                w = torch.softmax(k[b, h // (H // KV)][keep] @ q[b, h, t] * 0.5, 0)
                want[b, t, h] = w @ v[b, h // (H // KV)][keep]
    module = torch.nn.Module()
    got, _ = lowp.grouped_attention(module, q, k, v, allowed, scaling=0.5)
    torch.testing.assert_close(got, want)
    additive = torch.zeros(B, 1, Tq, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    torch.testing.assert_close(lowp.grouped_attention(module, q, k, v, additive, scaling=0.5)[0], want)
    torch.testing.assert_close(lowp.grouped_attention(module, q[1:], k[1:], v[1:], None, scaling=0.5)[0], want[1:])


@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_sampler_copy_is_the_learner_in_bf16_after_every_update(tiny_lm_dir, tmp_path, ppo_epochs):
    """bf16 mixed precision: the trainer samples from a bf16 copy whose parameters equal the fp32
    learner's, rounded, after each update (also one of several optimizer steps); buffers
    (rotary frequencies) stay fp32."""
    tr = make_trainer(tiny_lm_dir, tmp_path, mixed_precision="bf16", max_steps=2, lr=1e-2,
                      train_dataset=prompt_dataset(TRAIN_PROMPTS), ppo_epochs=ppo_epochs)
    assert tr.sampler is not None and tr.sampling_lm()[0] is tr.sampler.lm
    lm = tr.acc.unwrap_model(tr.policy).lm
    before = snapshot(tr.sampler.lm)
    for _ in range(2):
        tr.train_step()
        for (name, p), s in zip(lm.named_parameters(), tr.sampler.lm.parameters()):
            assert s.dtype == torch.bfloat16 and not s.requires_grad
            assert torch.equal(s, p.detach().to(torch.bfloat16)), name
    assert any(not torch.equal(before[n], p) for n, p in tr.sampler.lm.named_parameters())  # it did move
    for (name, b), b_src in zip(tr.sampler.lm.named_buffers(), lm.named_buffers()):
        assert b.dtype == b_src[1].dtype, name
    record = json.loads((tmp_path / "config.json").read_text())["cpu_layer"]
    assert record["enabled"] and record["attention"] == "grouped" and record["sampler_copy"]


def test_sampler_copy_under_lora_refreshes_the_adapter_only(tiny_lm_dir, tmp_path):
    tr = make_trainer(tiny_lm_dir, tmp_path, mixed_precision="bf16", lora_r=4, lr=1e-2)
    names = [n for n, p in tr.acc.unwrap_model(tr.policy).lm.named_parameters() if p.requires_grad]
    assert len(tr.sampler.pairs) == len(names) > 0 and all("lora_" in n for n in names)
    base_before = {n: p.clone() for n, p in tr.sampler.lm.named_parameters() if "lora_" not in n}
    tr.train_step()
    lm = tr.acc.unwrap_model(tr.policy).lm
    for (n, p), s in zip(lm.named_parameters(), tr.sampler.lm.parameters()):
        assert torch.equal(s, p.detach().to(torch.bfloat16)), n
        if n in base_before:
            assert torch.equal(s, base_before[n]), n


def test_no_copy_in_fp32_or_when_turned_off(tiny_lm_dir, tmp_path):
    from accelerate.state import AcceleratorState

    tr = make_trainer(tiny_lm_dir, tmp_path / "a", mixed_precision="no")
    assert tr.sampler is None and tr.sampling_lm()[0] is tr.acc.unwrap_model(tr.policy).lm
    assert tr.acc.unwrap_model(tr.policy).lm.config._attn_implementation == "sdpa"
    AcceleratorState._reset_state(True)
    tr = make_trainer(tiny_lm_dir, tmp_path / "b", mixed_precision="bf16", cpu_layer="off")
    assert tr.sampler is None and tr.acc.unwrap_model(tr.policy).lm.config._attn_implementation == "sdpa"
    tr.train_step()  # samples under autocast instead


def test_auto_precision_follows_the_timed_probe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for fast, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(lowp, "cpu_bf16_is_fast", lambda fast=fast: fast)
        assert setup.resolve_precision("auto") == want
    for mode in ("no", "bf16", "fp16"):
        assert setup.resolve_precision(mode) == mode


def test_a_resumed_run_keeps_the_precision_it_started_with(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lowp, "cpu_bf16_is_fast", lambda: True)  # the probe would now say bf16
    (tmp_path / "config.json").write_text('{"resolved_mixed_precision": "no"}')
    assert setup.resolve_precision("auto", str(tmp_path)) == "no"
    assert setup.resolve_precision("bf16", str(tmp_path)) == "bf16"  # a given precision is kept as given
    assert setup.resolve_precision("auto", str(tmp_path / "nothing_recorded")) == "bf16"


@pytest.mark.parametrize("bf16_ms, want, bf16_products", [
    ([0.3] * 6, True, 2),  # fast: the cold product, then the first timed one decides
    ([9.0, 0.3], True, 2),  # a slow cold product (kernel selection), then fast
    ([0.9] * 6, False, 6),  # about as fast as fp32: every repeat is timed
    ([25.0], False, 1),  # emulated bf16 (an AVX2-only CPU: ~80x fp32): stop at the cold product
    ([5.0, 3.0], False, 2),  # over 4x the limit: stop at the first timed product
])
def test_bf16_probe_decides_and_stops_early(monkeypatch, bf16_ms, want, bf16_products):
    """fp32 takes 1 ms: bf16 wins under 0.6 ms. Fake timings, so the decision is the rule's, not the CPU's."""
    calls = []

    def fake(a, b):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            return 1e-3
        return bf16_ms[min(calls.count(torch.bfloat16), len(bf16_ms)) - 1] * 1e-3

    monkeypatch.setattr(lowp, "_matmul_seconds", fake)
    assert lowp.cpu_bf16_is_fast.__wrapped__(size=8) is want
    assert calls.count(torch.bfloat16) == bf16_products and calls.count(torch.float32) == 6


def test_the_cpu_layer_runs_on_a_cpu_with_unsharded_weights_only():
    from pg_lm.lm import cpu

    assert cpu.resolve("auto", "cpu") and cpu.resolve("on", "cpu")
    assert not cpu.resolve("auto", "cuda") and not cpu.resolve("auto", "cpu", sharded=True)
    assert not cpu.resolve("off", "cpu") and not cpu.resolve("off", "cuda")
    with pytest.raises(ValueError, match="--cpu-layer on needs a CPU device"):
        cpu.resolve("on", "cuda")
    with pytest.raises(ValueError, match="--cpu-layer on cannot run under FSDP"):
        cpu.resolve("on", "cpu", sharded=True)


def test_grouped_attention_and_sampling_copy_only_under_the_cpu_layer_in_low_precision(tiny_lm_dir, tmp_path):
    """The CPU layer in fp32 decodes with its own kernels but trains on the model's attention, with no copy."""
    tr = make_trainer(tiny_lm_dir, tmp_path, mixed_precision="no")
    record = json.loads((tmp_path / "config.json").read_text())["cpu_layer"]
    assert record == {"mode": "auto", "enabled": True, "decode": "llama", "decode_gemm": True, "attention": "model",
                      "sampler_copy": False, "process_settings": record["process_settings"]}
    assert tr.cpu_layer and tr.sampler is None


@pytest.mark.parametrize("lora_r", [0, 4])
def test_update_forward_takes_the_copys_weights_with_autocasts_gradient(tiny_lm_dir, tmp_path, lora_r):
    """In bf16 the update's forward reads its linear weights from the sampling copy (autocast's casts,
    already made) while the copy is current: the same log-probs and the same gradient, bit for bit, as
    autocast casting the fp32 weights itself; after an optimizer step the copy is stale and unused."""
    tr = make_trainer(tiny_lm_dir, tmp_path, mixed_precision="bf16", lora_r=lora_r, lr=1e-2,
                      train_dataset=prompt_dataset(TRAIN_PROMPTS))
    lm = tr.acc.unwrap_model(tr.policy).lm
    linears = [m for m in lm.modules() if type(m) is torch.nn.Linear]
    assert len(tr.sampler.linear_weights(tr.param_names)) == len(linears) > 0
    batch, _ = tr.rollout()
    adv = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(0))

    def logp_and_grads():
        tr.policy.zero_grad(set_to_none=True)
        logp = tr.forward(batch, grad=True)[0]
        (logp * adv * batch.completion_mask).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None}

    with_copy = logp_and_grads()
    real = tr.sampler.linear_weights
    tr.sampler.linear_weights = lambda names: {}  # autocast casts every weight, as before
    without = logp_and_grads()
    tr.sampler.linear_weights = real
    assert torch.equal(with_copy[0], without[0])
    assert with_copy[1].keys() == without[1].keys() and len(without[1]) > 0
    for n in without[1]:
        assert torch.equal(with_copy[1][n], without[1][n]), n
    tr.update(batch, adv, None)  # the copy is stale between optimizer steps and current after the refresh
    assert tr.sampler.current and len(tr.sampler.linear_weights(tr.param_names)) == len(linears)
    tr.sampler.current = False
    assert tr.sampler.linear_weights(tr.param_names) == {}


def test_later_optimizer_steps_of_an_update_do_not_read_the_stale_copy(tiny_lm_dir, tmp_path, monkeypatch):
    """PPO epochs: the first optimizer step's forwards read the copy, the second's (after the weights
    moved) let autocast cast the new weights."""
    tr = make_trainer(tiny_lm_dir, tmp_path, mixed_precision="bf16", lr=1e-2, ppo_epochs=2,
                      train_dataset=prompt_dataset(TRAIN_PROMPTS))
    batch, _ = tr.rollout()
    adv = torch.randn(batch.completion_mask.shape, generator=torch.Generator().manual_seed(0))
    used = []
    real = tr.sampler.linear_weights
    monkeypatch.setattr(tr.sampler, "linear_weights", lambda names: used.append(bool(real(names))) or real(names))
    tr.update(batch, adv, None)
    assert used == [True, False]
