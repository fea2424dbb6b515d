"""The linear layers while decoding on a CPU: MKL's or oneDNN's fp32 GEMM, whichever is faster here.

Decoding multiplies a few rows (B = prompts x samples) by every weight of the model at every
step, a shape where the two GEMM libraries torch carries differ. torch sends an fp32
``F.linear`` to MKL; oneDNN's ``torch.ops.mkldnn._linear_pointwise`` is the other. On the
AVX2-only AMD EPYC this project is built on, at 16 rows (SmolLM2-135M's weights, 30 to 60
distinct weights per shape so that they stream from memory as in a decode step, best of 5):

    weight (out x in)   MKL       oneDNN
    49152 x 576         36.4 ms   20.5 ms   the vocabulary projection
    1536 x 576          909 us    757 us    MLP gate / up
    576 x 1536          784 us    649 us    MLP down
    576 x 576           320 us    321 us    attention q / o
    192 x 576           106 us    173 us    attention k / v

and other CPUs may rank them otherwise. :func:`decode_gemms` times both once per process for
each weight shape at the batch's row count (~1 s in all for SmolLM2, the first time) and
makes each ``nn.Linear`` of the model use the faster while sampling. The two agree to float
rounding (~1e-6 relative). Gradients never go through the swapped kernel: it is used only with
autograd off, and the layers are restored on leaving the block.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
def onednn_is_faster(out_features: int, in_features: int, rows: int, threads: int,
                     stream_bytes: int = 64 << 20) -> bool:
    """Whether oneDNN's fp32 linear beats MKL's for (rows, in) @ (in, out) on this CPU. Each is timed
    over distinct weights of that shape totalling ``stream_bytes`` (more than a CPU cache holds), so
    that they stream from memory as a decode step's weights do: with one weight kept in cache the
    ranking of the MLP shapes flipped from run to run here. Cached per shape and thread count."""
    if not torch.backends.mkldnn.is_available():
        return False
    n = max(1, min(64, stream_bytes // (4 * out_features * in_features)))
    weights = [torch.ones(out_features, in_features) for _ in range(n)]  # the values do not matter
    x = torch.ones(rows, 1, in_features)
    try:
        fast = _seconds(_onednn_linear, x, weights)
    except (RuntimeError, AttributeError):  # a build whose oneDNN lacks the op
        return False
    return fast < _seconds(F.linear, x, weights)


def _swappable(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32


def _onednn_forward(layer: nn.Linear):
    w, b = layer.weight, layer.bias

    def forward(x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():  # e.g. under autocast: as before
            return F.linear(x, w, b)
        return _onednn_linear(x, w, b)

    return forward


@contextmanager
def decode_gemms(lm: nn.Module, rows: int):
    """Inside the block, each fp32 ``nn.Linear`` of ``lm`` on a CPU runs oneDNN's GEMM where that is the
    faster here for ``rows`` rows; with autograd on, or on any other device or dtype, nothing changes."""
    swapped = []
    if not torch.is_grad_enabled():
        threads = torch.get_num_threads()
        for m in lm.modules():
            if _swappable(m) and onednn_is_faster(m.out_features, m.in_features, rows, threads):
                swapped.append((m, m.__dict__.get("forward")))
                m.forward = _onednn_forward(m)
    try:
        yield
    finally:
        for m, before in swapped:
            if before is None:
                del m.forward  # the class's forward again
            else:
                m.forward = before
