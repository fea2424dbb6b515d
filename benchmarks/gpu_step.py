"""pg_lm's training step on one CUDA GPU, at the arithmetic recipe's configuration.

The embedded SmolLM2-135M-Instruct, the recipe's defaults (RLOO, 4 prompts x 8 samples, 16 new
tokens, LoRA r16, ``--mixed-precision auto``: bf16 on a GPU with bf16), the plain path (the CPU
layer is off on a GPU). After ``--warmup`` steps, ``--steps`` timed steps report:

* median step time (sample + score + update) and its sampling / update parts (``--generator vllm``:
  sampled by a vLLM server, and the weight sync before each rollout);
* generation tokens/s: completion tokens / sampling time;
* peak GPU memory allocated by torch over the timed steps;
* MFU of the update: 6 x parameters x tokens through the model (prompt + completion tokens of the
  rows trained) / update time, against the bf16 matmul rate measured here (8192^3 products).
  With LoRA the backward skips the frozen weights' gradients, so 6x overstates the work a little.

    python benchmarks/gpu_step.py --output runs/bench/gpu_step.json

Without a CUDA device it says so and exits 0 (``make test-gpu`` then has nothing to time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bf16_peak(n: int = 8192, seconds: float = 3.0) -> float:
    """FLOP/s of repeated (n, n) @ (n, n) bf16 products on the current GPU."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if reps % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default=None)
    p.add_argument("--generator", default="hf", choices=["hf", "vllm"], help="what samples (docs/inference-engine.md)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step.py: no CUDA device here, nothing to measure")
        return 0
    from _lm_setup import build_pg_lm

    trainer = build_pg_lm({"max_steps": args.warmup + args.steps + 1, "max_seconds": None, "generator": args.generator},
                          tempfile.mkdtemp())
    params = sum(p.numel() for p in trainer.acc.unwrap_model(trainer.policy).parameters())
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rows = []
    for _ in range(args.steps):
        s = trainer.train_step()
        torch.cuda.synchronize()
        rows.append(s)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    step_s, gen_s, train_s = (median(r[k] for r in rows) for k in ("perf/step_s", "perf/gen_s", "perf/train_s"))
    sync_s = median(r.get("perf/sync_s", 0.0) for r in rows)
    if trainer.engine is not None:
        trainer.engine.close()
    cfg = trainer.cfg
    new_tokens = median(r["completion/length"] for r in rows) * cfg.prompts_per_step * cfg.samples_per_prompt
    # tokens through the model in the update: the rows trained, each its completion, and each group its
    # prompt once (shared-prompt forward); prompt length from the first training prompt, chat template applied
    from pg_lm.lm.sampling import encode_prompts

    prompt_tokens = int(encode_prompts(trainer.tok, [trainer.train_ds[0]["prompt"]], True, None)[1].sum())
    prompt_tokens *= cfg.prompts_per_step
    update_tokens = median(r["perf/trained_frac"] for r in rows) * (new_tokens + prompt_tokens)
    peak = bf16_peak()
    result = dict(benchmark="gpu_step", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), generator=args.generator, median_sync_s=sync_s,
                  mixed_precision=trainer.acc.mixed_precision,
                  cpu_layer=trainer.cpu_layer, params=params, steps=args.steps, median_step_s=step_s,
                  median_gen_s=gen_s, median_train_s=train_s, generation_tokens_per_s=new_tokens / gen_s,
                  peak_memory_gb=peak_gb, bf16_matmul_tflops=peak / 1e12,
                  update_mfu=6 * params * update_tokens / train_s / peak,
                  reward_first=rows[0]["reward/mean"], reward_last=rows[-1]["reward/mean"])
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
