"""What one decode step of SmolLM2-135M costs in matmuls alone, on this machine.

Replays the linear layers of one decode step -- 30 layers of q/k/v/o, gate/up, down
projections with distinct weights (so they stream from memory, as in the model), then the
tied LM head -- for M rows (the batch being decoded), in fp32 and bf16, and prints the
milliseconds per step with the rate it implies: GFLOP/s (2 x M x parameters) and GB/s of
weights read. Also the machine's read bandwidth (a sum over 256 MB), the floor for one
pass over the weights. If the time grows with M and halves with a second thread, the
matmul kernel's arithmetic, not memory, sets the pace.

Two ways: "F.linear" (torch's default GEMM on the seven separate weights of a layer) and "pg_lm"
(what ``decode_llama`` runs: q|k|v and gate|up concatenated, four GEMMs a layer, each through
``decode_gemm.gemm``, i.e. the faster kernel here for that shape as its probe decides).

    python benchmarks/decode_matmuls.py [--threads 1 2] [--rows 1 16 32 64]
"""

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, KV, FFN, LAYERS, VOCAB = 576, 192, 1536, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
FUSED = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN)]  # q|k|v, o, gate|up, down
PARAMS = LAYERS * sum(o * i for o, i in SHAPES) + VOCAB * HIDDEN


def per_step_ms(dtype, rows: int, way: str = "F.linear", repeats: int = 10) -> float:
    from pg_lm.lm.cpu.decode_gemm import gemm

    def linear(w):
        return (lambda x: F.linear(x, w)) if way == "F.linear" else gemm(w, None, rows)

    shapes = SHAPES if way == "F.linear" else FUSED
    layers = [[(i, linear(torch.randn(o, i, dtype=dtype))) for o, i in shapes] for _ in range(LAYERS)]
    head = linear(torch.randn(VOCAB, HIDDEN, dtype=dtype))
    x, h = torch.randn(rows, 1, HIDDEN, dtype=dtype), torch.randn(rows, 1, FFN, dtype=dtype)

    def step():
        for fns in layers:
            for fan_in, fn in fns:
                fn(h if fan_in == FFN else x)
        head(x)

    step()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t) / repeats * 1e3


def read_gb_per_s(mb: int = 256, repeats: int = 5) -> float:
    a = torch.ones(mb << 18)  # fp32: mb MB
    a.sum()
    t = time.perf_counter()
    for _ in range(repeats):
        a.sum()
    return a.numel() * 4 * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64])
    p.add_argument("--ways", nargs="+", choices=("F.linear", "pg_lm"), default=["F.linear", "pg_lm"])
    args = p.parse_args()
    print(f"torch {torch.__version__}; {PARAMS / 1e6:.1f}M parameters in the replayed matmuls")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s): read bandwidth {read_gb_per_s():.1f} GB/s")
        for dtype in (torch.float32, torch.bfloat16):
            for rows in args.rows:
                for way in args.ways:
                    with torch.no_grad():
                        ms = per_step_ms(dtype, rows, way)
                    gb = PARAMS * dtype.itemsize / 1e9
                    print(f"  {str(dtype):15} {way:8} rows {rows:3}: {ms:6.1f} ms per decode step (matmuls only), "
                          f"{2 * rows * PARAMS / ms / 1e6:5.0f} GFLOP/s, weights read at {gb / ms * 1e3:5.1f} GB/s")


if __name__ == "__main__":
    main()
