"""The linear layers while decoding on a CPU: the faster of two GEMMs for each weight shape.

Decoding multiplies a few rows (B = prompts x samples) by every weight of the model at every
step, a shape where the GEMM libraries torch carries differ, and rank differently from CPU to
CPU. torch sends ``F.linear`` to MKL (fp32) or to oneDNN on the weight as it is laid out (bf16);
the other candidate is oneDNN's ``torch.ops.mkldnn._linear_pointwise``, in bf16 on a weight
reordered once into oneDNN's own blocked layout (``torch.ops.mkldnn._reorder_linear_weight``,
what inductor's freezing pass does). :func:`decode_gemms` times both once per process for each
weight shape, dtype and row count (:func:`onednn_is_faster`) and makes each ``nn.Linear`` of the
model use the faster while sampling. fp32 results agree to float rounding (~1e-6 relative); the
reordered weights are made on entering the block (2 bytes per parameter while it lasts).
Gradients never go through the swapped kernel: it is used only with autograd off, and the layers
are restored on leaving the block. Figures per CPU: ``docs/performance.md``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F


REORDERED = (torch.bfloat16,)  # dtypes whose oneDNN candidate runs on a reordered weight


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight.T: ``weight`` (out, in) as laid out, or reordered by :func:`_reorder`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _reorder(weight: Tensor, rows: int) -> Tensor:
    """``weight`` (out, in) in oneDNN's blocked layout for ``rows``-row products (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _seconds(fn, x: Tensor, weights: list[Tensor], repeats: int = 3) -> float:
    """Best of ``repeats`` passes of ``fn(x, w, None)`` over ``weights``; one untimed pass first."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w, None)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


@functools.lru_cache(maxsize=None)
def can_reorder(dtype: torch.dtype) -> bool:
    """Whether this CPU and torch build can reorder a ``dtype`` weight for oneDNN. torch's bf16 reorder
    needs AVX512-BW/VL/DQ or AVX-NE-CONVERT and raises ``RuntimeError`` on an AVX2-only CPU; there bf16
    decoding keeps ``F.linear``."""
    try:
        _reorder(torch.ones(8, 8, dtype=dtype), 1)
    except (RuntimeError, AttributeError):  # no such CPU support, or a build without the op
        return False
    return True


@functools.lru_cache(maxsize=None)
def onednn_is_faster(out_features: int, in_features: int, rows: int, threads: int,
                     dtype: torch.dtype = torch.float32, stream_bytes: int = 64 << 20) -> bool:
    """Whether oneDNN's linear (on reordered weights for a dtype in ``REORDERED``) beats ``F.linear``
    for (rows, in) @ (in, out) in ``dtype`` on this CPU. Each is timed over distinct weights of that
    shape totalling ``stream_bytes`` (more than a CPU cache holds), so that they stream from memory as
    a decode step's weights do (with one weight kept in cache the ranking of some shapes is unstable).
    Cached per shape, thread count and dtype."""
    if not torch.backends.mkldnn.is_available() or (dtype in REORDERED and not can_reorder(dtype)):
        return False
    size = out_features * in_features * torch.finfo(dtype).bits // 8
    n = max(1, min(64, stream_bytes // size))
    weights = [torch.ones(out_features, in_features, dtype=dtype) for _ in range(n)]  # the values do not matter
    x = torch.ones(rows, 1, in_features, dtype=dtype)
    try:
        candidates = [_reorder(w, rows) for w in weights] if dtype in REORDERED else weights
        fast = _seconds(_onednn_linear, x, candidates)
    except (RuntimeError, AttributeError):  # a build whose oneDNN lacks the op
        return False
    return fast < _seconds(F.linear, x, weights)


def _swappable(m: nn.Module) -> bool:
    return (type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype in (torch.float32, *REORDERED))


def gemm(weight: Tensor, bias: Tensor | None, rows: int) -> Callable[[Tensor], Tensor]:
    """``x (..., in) -> x @ weight.T + bias`` (no autograd) through the faster GEMM here for ``rows``-row
    products: oneDNN's (on ``weight`` reordered now, for a dtype in ``REORDERED``) where the probe says so,
    else ``F.linear``. The reordering is made on this call: the caller makes a new function when the weight
    changes (a cache keyed on the weight's version counter would miss updates that do not bump it; the fused
    AdamW step does not)."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if not (w.device.type == "cpu" and w.dtype in (torch.float32, *REORDERED)
            and onednn_is_faster(w.shape[0], w.shape[1], rows, torch.get_num_threads(), w.dtype)):
        return lambda x: F.linear(x, w, b)
    w_onednn = _reorder(w, rows) if w.dtype in REORDERED else w
    return lambda x: _onednn_linear(x, w_onednn, b)


def _onednn_forward(layer: nn.Linear, rows: int):
    w, b = layer.weight, layer.bias
    fast = gemm(w, b, rows)  # made afresh for each block (see gemm)

    def forward(x: Tensor) -> Tensor:
        if x.dtype != w.dtype or torch.is_grad_enabled():  # e.g. under autocast: as before
            return F.linear(x, w, b)
        return fast(x)

    return forward


@contextmanager
def decode_gemms(lm: nn.Module, rows: int, skip: Collection[nn.Module] = ()):
    """Inside the block, each fp32 / bf16 ``nn.Linear`` of ``lm`` on a CPU (but those in ``skip``) runs oneDNN's
    GEMM where that is the faster here for ``rows`` rows; with autograd on, or on any other device or dtype,
    nothing changes."""
    swapped = []
    if not torch.is_grad_enabled():
        threads = torch.get_num_threads()
        skip = {id(m) for m in skip}
        for m in lm.modules():
            if (_swappable(m) and id(m) not in skip
                    and onednn_is_faster(m.out_features, m.in_features, rows, threads, m.weight.dtype)):
                swapped.append((m, m.__dict__.get("forward")))
                m.forward = _onednn_forward(m, rows)
    try:
        yield
    finally:
        for m, before in swapped:
            if before is None:
                del m.forward  # the class's forward again
            else:
                m.forward = before
