"""What one decode step of SmolLM2-135M costs in matmuls alone, on this machine.

Replays the linear layers of one decode step -- 30 layers of q/k/v/o, gate/up, down
projections with distinct weights (so they stream from memory, as in the model), then the
tied LM head -- for M rows (the batch being decoded), in fp32 and bf16, and prints the
milliseconds per step. At small M the time is set by memory bandwidth, not FLOPs.

    python benchmarks/decode_matmuls.py
"""

import time

import torch
import torch.nn.functional as F

HIDDEN, KV, FFN, LAYERS, VOCAB = 576, 192, 1536, 30, 49152


def per_step_ms(dtype, rows: int, repeats: int = 10) -> float:
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN)]
    layers = [([torch.randn(s, dtype=dtype) for s in shapes], torch.randn(HIDDEN, FFN, dtype=dtype))
              for _ in range(LAYERS)]
    head = torch.randn(VOCAB, HIDDEN, dtype=dtype)
    x, h = torch.randn(rows, HIDDEN, dtype=dtype), torch.randn(rows, FFN, dtype=dtype)

    def step():
        for ws, down in layers:
            for w in ws:
                F.linear(x, w)
            F.linear(h, down)
        F.linear(x, head)

    step()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t) / repeats * 1e3


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (16, 32, 64):
            print(f"{str(dtype):15} rows {rows:3}: {per_step_ms(dtype, rows):6.1f} ms per decode step (matmuls only)")
