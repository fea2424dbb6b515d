"""One decode step of a Llama-architecture model in ~20 tensor ops a layer, for sampling on a CPU.

A decode step multiplies a few rows by every weight; on a CPU the rest of the step is many small
ops, each costing the dispatcher's few microseconds whatever its size. transformers' Llama layer
runs ~80 of them (casts around each RMSNorm, rotary's slices and concatenations, a growing KV cache
re-concatenated every step, mask construction); SmolLM2-135M has 30 layers. This module runs the
same computation with fewer ops:

* q/k/v are one GEMM on their concatenated weights, and gate/up another, where they are plain
  ``nn.Linear`` layers (:func:`fused_projections`; the same numbers in 4 GEMMs a layer instead
  of 7); q and k are rotated together;
* the KV cache is allocated once for the whole completion and written in place;
* the attention mask is built once (left padding and the not-yet-written slots), then sliced;
* rotary embedding as ``x cos + roll(x) sin'`` (sin' carries rotate_half's sign), one step's
  (cos, sin) from the model's own rotary module, so RoPE scaling variants stay the model's;
* grouped-query attention without repeating K/V, in fp32 (at decode shapes a CPU's fp32 batched
  matmul beats its bf16 one) on a cache in the model's dtype;
* RMSNorm through ``torch.rms_norm`` (normalised in fp32, as the model does).

Other projections are the model's own modules (so LoRA adapters and ``decode_gemm``'s kernels
apply). What it supports is checked, not assumed (:func:`supports`): ``model_type`` "llama"
with the standard layer layout, no sliding window. Anything else decodes through the model's own
forward. The prompt is still encoded by the model's forward; its KV cache is copied in.
Tested against transformers' forward: same logits (fp32, 1e-5) and greedy tokens
(tests/test_lm_decode_llama.py). Left out: beam search, speculative decoding, paged caches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _base(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def supports(lm: nn.Module) -> bool:
    """Whether ``lm`` (a transformers causal LM, or a PEFT model around one) is a Llama this module can step."""
    base = _base(lm)
    cfg = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama" or inner is None:
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "hidden_act", "silu") != "silu":
        return False
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, n) for n in need) or base.get_output_embeddings() is None:
        return False
    layer = inner.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (attn is not None and mlp is not None
            and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and all(hasattr(getattr(layer, n, None), "weight") for n in ("input_layernorm", "post_attention_layernorm")))


def _cache_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    """[(keys, values)] per layer, each (B, KV, L, D), of a transformers KV cache (5.x ``layers``, 4.x lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _fusable(linears: list[nn.Module]) -> bool:
    """Whether these layers are plain ``nn.Linear`` of one dtype, with biases on all or none."""
    return (all(type(m) is nn.Linear for m in linears) and len({m.weight.dtype for m in linears}) == 1
            and len({m.bias is None for m in linears}) == 1)


def fused_projections(lm: nn.Module, rows: int) -> tuple[list[tuple], list[nn.Module]]:
    """Per layer, (q|k|v GEMM or None, gate|up GEMM or None) on concatenated weights for ``rows``-row products
    (``decode_gemm.gemm``, so the faster kernel here), None where the layers cannot be fused (LoRA wraps
    them); and the linear layers fused, which ``decode_gemm.decode_gemms`` then need not prepare. Made from the
    weights as they are now: once per ``generate``."""
    from .decode_gemm import gemm

    def cat(linears):
        if not _fusable(linears):
            return None
        bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        return gemm(torch.cat([m.weight.detach() for m in linears]), bias, rows)

    plans, fused = [], []
    for layer in _base(lm).model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gu = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        plans.append((cat(qkv), cat(gu)))
        fused += (qkv if plans[-1][0] else []) + (gu if plans[-1][1] else [])
    return plans, fused


class LlamaDecoder:
    """Decodes after a prompt: ``step(tokens (B,), positions (B, 1)) -> logits (B, V)``.

    ``cache``: the prompt's KV cache from the model's forward, already repeated to B rows;
    ``prompt_mask`` (B, P): 1 on real prompt tokens; room for ``max_new_tokens`` more. The cache is
    kept in the model's dtype (as the model's own cache is: half the memory traffic in bf16) and
    the attention computed in fp32 (faster than a bf16 batched matmul at these small shapes).
    """

    def __init__(self, lm: nn.Module, cache, prompt_mask: Tensor, max_new_tokens: int, projections=None):
        base = _base(lm)
        # (q|k|v, gate|up) GEMMs per layer from fused_projections, or None: the model's own modules
        self.projections = projections or [(None, None)] * len(base.model.layers)
        self.inner, self.head = base.model, base.get_output_embeddings()
        self.layers = list(self.inner.layers)
        B, P = prompt_mask.shape
        L = P + max_new_tokens
        self.t = P  # the next slot to write
        self.k, self.v = [], []
        for keys, values in _cache_tensors(cache):  # (B, KV, P, D)
            KV, D = keys.shape[1], keys.shape[3]
            k = keys.new_zeros(B * KV, L, D)  # (B KV, L, D): row b's head j at b KV + j
            v = values.new_zeros(B * KV, L, D)
            k[:, :P], v[:, :P] = keys.reshape(B * KV, P, D), values.reshape(B * KV, P, D)
            self.k.append(k)
            self.v.append(v)
        self.kv_heads = KV
        allowed = torch.cat([prompt_mask.bool(), torch.ones(B, max_new_tokens, dtype=torch.bool,
                                                             device=prompt_mask.device)], 1)  # (B, L)
        # additive mask (B KV, 1, L); the slots after the current step are cut off by slicing
        self.mask = torch.zeros(B, L, device=prompt_mask.device).masked_fill(~allowed, float("-inf"))
        self.mask = self.mask.repeat_interleave(KV, 0)[:, None]

    def _rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin') for this step, each (B, 1, D) fp32, from the model's own rotary module."""
        like = self.mask[:1, :1]  # fp32 on the cache's device: only its dtype and device are read
        cos, sin = self.inner.rotary_emb(like, positions)  # (B, 1, D) each
        half = cos.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], -1)  # rotate_half(x) sin = roll(x, D/2) sin'

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        B, KV = tokens.shape[0], self.kv_heads
        x = self.inner.embed_tokens(tokens[:, None])  # (B, 1, H)
        cos, sin = self._rotary(positions)
        t, n = self.t, self.t + 1
        mask = self.mask[..., :n]  # (B KV, 1, n)
        for i, (layer, (qkv_gemm, gu_gemm)) in enumerate(zip(self.layers, self.projections)):
            attn, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            h = torch.rms_norm(x, ln1.weight.shape, ln1.weight, _eps(ln1))  # (B, 1, H)
            D = attn.head_dim
            qkv = qkv_gemm(h) if qkv_gemm else torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
            qkv = qkv.float().view(B, -1, D)  # (B, Hq + 2 KV, D): query heads, key heads, value heads
            Hq = qkv.shape[1] - 2 * KV
            qk = qkv[:, : Hq + KV]
            qk = qk * cos + qk.roll(D // 2, -1) * sin  # rotary on the query and key heads together
            self.k[i].view(B, KV, -1, D)[:, :, t] = qk[:, Hq:]
            self.v[i].view(B, KV, -1, D)[:, :, t] = qkv[:, Hq + KV :]
            q = qk[:, :Hq].reshape(B * KV, -1, D)  # (B KV, G, D): the G query heads of each K/V head
            keys, values = self.k[i][:, :n].float(), self.v[i][:, :n].float()  # (B KV, n, D)
            scores = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=attn.scaling)  # (B KV, G, n)
            out = torch.bmm(scores.softmax(-1), values)  # (B KV, G, D)
            x = x + attn.o_proj(out.view(B, 1, -1).to(x.dtype))
            h = torch.rms_norm(x, ln2.weight.shape, ln2.weight, _eps(ln2))
            if gu_gemm:
                gu = gu_gemm(h)  # (B, 1, 2 I)
                act = F.silu(gu[..., : gu.shape[-1] // 2]) * gu[..., gu.shape[-1] // 2 :]
            else:
                act = F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)
            x = x + mlp.down_proj(act)
        self.t = n
        x = torch.rms_norm(x, self.inner.norm.weight.shape, self.inner.norm.weight, _eps(self.inner.norm))
        return self.head(x)[:, -1]  # (B, V)
