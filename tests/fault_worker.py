"""A 2-process run for tests/test_faults.py, launched with ``accelerate launch``:

    fault_worker.py MODEL_DIR OUT_DIR raise|hang|uneven

``raise``: rank 1's reward function raises at its second call and the process exits;
``hang``: the same, but rank 1's process then stays alive (as a process stuck elsewhere
would), so rank 0's next collective never completes on its own; ``uneven``: no fault, an
evaluation set of 3 prompts split over 2 processes (2 and 1 rows).
"""

import os
import sys
import time

from datasets import Dataset

from pg_lm.lm import LMConfig
from pg_lm.lm.train import train


def main(model_dir: str, out_dir: str, mode: str) -> None:
    rank, calls = int(os.environ.get("RANK", 0)), []

    def reward(prompts, completions, **_):
        calls.append(1)
        if mode != "uneven" and rank == 1 and len(calls) == 2:
            raise RuntimeError("reward server unreachable")
        return [float(len(c) % 3) for c in completions]

    cfg = LMConfig(model=model_dir, output_dir=out_dir, max_steps=3, prompts_per_step=2, samples_per_prompt=2,
                   max_new_tokens=4, eval_max_new_tokens=4, progress=False, mixed_precision="no", eval_size=3,
                   lora_r=0, lr_schedule="constant")
    ds = Dataset.from_dict({"prompt": ["ab", "cd", "ef"]})
    try:
        train(cfg, [reward], ds, ds)
    except Exception:
        if mode == "hang":
            time.sleep(300)
        raise


if __name__ == "__main__":
    main(*sys.argv[1:4])
