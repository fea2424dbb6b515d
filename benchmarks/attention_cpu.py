"""torch's SDPA against pg_lm's grouped attention (pg_lm.lm.cpu.lowp.grouped_attention) on this CPU.

The shapes are SmolLM2-135M's (9 query heads over 3 K/V heads, head size 64) at the arithmetic
task's batch (16 rows): one decode step (1 query against L keys) and the training forward of
24 completion tokens against their prompt (forward + backward). SDPA runs through
transformers' own ``sdpa_attention_forward`` (which packs or repeats the query/K/V heads as the
model would), with the boolean mask transformers builds; times are per call, best of 3 rounds.

    python benchmarks/attention_cpu.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from pg_lm.lm.cpu.lowp import grouped_attention  # noqa: E402

B, H, KV, D = 16, 9, 3, 64


def per_call_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def case(dtype, Tq: int, L: int, backward: bool) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype).requires_grad_(backward)
    k, v = (torch.randn(B, KV, L, D, generator=g).to(dtype).requires_grad_(backward) for _ in range(2))
    mask = torch.ones(B, 1, Tq, L, dtype=torch.bool).tril(L - Tq)
    mask[:, :, :, :5] = False  # left padding
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = H // KV, True

    def sdpa():  # transformers' own SDPA path, as the model calls it
        o, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
        if backward:
            o.sum().backward()

    def grouped():
        o, _ = grouped_attention(module, q, k, v, mask, scaling=D ** -0.5)
        if backward:
            o.sum().backward()

    with torch.set_grad_enabled(backward):
        reps = 20 if backward else 200
        return per_call_us(sdpa, reps), per_call_us(grouped, reps)


def main() -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<44}{'SDPA us':>10}{'grouped us':>12}")
    for dtype in (torch.bfloat16, torch.float32):
        for label, Tq, L, bwd in (("decode, 1 query x 60 keys", 1, 60, False), ("decode, 1 query x 84 keys", 1, 84, False),
                                  ("training fwd+bwd, 24 queries x 84 keys", 24, 84, True)):
            s, gr = case(dtype, Tq, L, bwd)
            print(f"{str(dtype).replace('torch.', '') + ', ' + label:<44}{s:>10.0f}{gr:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
