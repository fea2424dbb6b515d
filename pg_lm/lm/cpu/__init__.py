"""The CPU speed layer: work that makes an RL step faster on a CPU and that a GPU does not need.

* :mod:`.decode_gemm` -- while sampling, each linear layer runs the faster of two GEMM libraries
  for its shape (timed once per process);
* :mod:`.decode_llama` -- a Llama decode step in ~20 tensor ops a layer, with a preallocated KV cache;
* :mod:`.lowp` -- the bf16 probe, a grouped-query attention kernel for bf16/fp16 training and a
  low-precision sampling copy of the weights;
* :mod:`.process` -- glibc malloc and transparent-huge-page settings for the whole process.

The trainer's default path (the model's own forward, KV-cache generation through the model,
precision through Accelerate) is what every device runs; this layer replaces parts of it only
where :func:`resolve` says so: ``--cpu-layer auto`` turns it on when the device is a CPU and the
parameters are not sharded (FSDP / DeepSpeed), ``off`` never, ``on`` always (an error where it
cannot run). Nothing here acts at import: the CLI and the recipes call
:func:`process.apply_process_settings` at start-up. Each piece is tested equal to the plain path
(``tests/test_lm_decode_*.py``, ``tests/test_lm_lowp.py``); why each exists:
``docs/performance.md``.
"""

from __future__ import annotations

MODES = ("auto", "on", "off")


def resolve(mode: str, device_type: str, sharded: bool = False) -> bool:
    """Whether the CPU layer runs for ``--cpu-layer mode`` on a ``device_type`` ("cpu", "cuda", ...)
    device, ``sharded`` when FSDP or DeepSpeed owns the parameters. ``on`` where it cannot run is a
    ``ValueError`` naming the flag."""
    if mode not in MODES:
        raise ValueError(f"--cpu-layer must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "on" and device_type != "cpu":
        raise ValueError(f"--cpu-layer on needs a CPU device, but this run's device is {device_type}: "
                         "use --cpu-layer auto or off")
    if mode == "on" and sharded:
        raise ValueError("--cpu-layer on cannot run under FSDP or DeepSpeed (its sampling copy and decoder "
                         "need whole, unsharded weights): use --cpu-layer auto or off")
    return mode == "on" or (mode == "auto" and device_type == "cpu" and not sharded)
