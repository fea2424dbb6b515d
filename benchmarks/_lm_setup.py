"""Building the two LM trainers the benchmarks compare, on the same task and model.

pg_lm: ``pg_lm.lm.trainer.Trainer`` on ``LMConfig`` (recipe defaults + overrides).
TRL: ``trl.GRPOTrainer`` on a conversational copy of the same prompts (so TRL applies
the same chat template) with ``shuffle_dataset=False`` so that it sees them in the
order given. Both score completions with pg_lm's ``exact_match``, and both are
evaluated by :func:`greedy_accuracy` -- one function, so the accuracy is the same
measurement for both libraries.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from pg_lm.lm.models import resolve_model
from pg_lm.tasks.arithmetic import arithmetic_datasets, exact_match

MODEL_NAME = "smollm2-135m-instruct"
NUM_EVAL = 100  # held-out prompts (the recipe's eval_size)
EVAL_NEW_TOKENS = 16  # the recipe's eval_max_new_tokens


def recipe_defaults() -> dict:
    """``recipes/arithmetic.py``'s settings: LMConfig's defaults with the recipe's DEFAULTS over them
    (imported from the file, so they never drift)."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    from pg_lm.lm.config import LMConfig

    path = Path(__file__).resolve().parents[1] / "recipes" / "arithmetic.py"
    spec = importlib.util.spec_from_file_location("_recipe_arithmetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {**dataclasses.asdict(LMConfig()), **mod.DEFAULTS}


def build_pg_lm(overrides: dict, output_dir: str):
    """A pg_lm Trainer at the recipe defaults with ``overrides``; no progress bar, no checkpoint."""
    from pg_lm.lm.config import LMConfig
    from pg_lm.lm.trainer import Trainer

    kw = {**recipe_defaults(), **overrides, "output_dir": output_dir, "progress": False, "save_model": False}
    train, held_out = arithmetic_datasets(num_eval=NUM_EVAL)
    return Trainer(LMConfig(**kw), [exact_match], train, held_out)


def pg_lm_step_prompts(trainer, steps: int) -> tuple[list[str], list[str]]:
    """(prompts, answers) pg_lm's trainer will use at steps 0..steps-1, flattened in order.
    Uses ``Trainer.prompts``, the prompts of a step."""
    prompts, answers = [], []
    for s in range(steps):
        p, cols = trainer.prompts(s)
        prompts += list(p)
        answers += list(cols["answer"])
    return prompts, answers


def trl_reward(prompts, completions, answer, **_) -> list[float]:
    """pg_lm's ``exact_match`` on TRL's conversational completions."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return exact_match(prompts, texts, answer=answer)


trl_reward.__name__ = "exact_match"


def trl_dataset(prompts: list[str], answers: list[str]):
    """Conversational rows (one user turn) in the given order, with their answers."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts], "answer": list(answers)})


def build_trl(prompts: list[str], answers: list[str], args: dict, callbacks=()):
    """A GRPOTrainer on ``prompts`` with GRPOConfig(**args) (in this order with ``shuffle_dataset=False``)."""
    from trl import GRPOConfig, GRPOTrainer

    base = dict(report_to="none", save_strategy="no", push_to_hub=False, disable_tqdm=True)  # no side outputs
    from transformers.trainer_callback import PrinterCallback

    cfg = GRPOConfig(**{**base, **args})
    trainer = GRPOTrainer(model=resolve_model(MODEL_NAME), reward_funcs=trl_reward, args=cfg,
                          train_dataset=trl_dataset(prompts, answers), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # a dict on stdout per log step; the callbacks keep what we need
    return trainer


def crn_seed(seed: int, step: int) -> int:
    """The seed both libraries' samplers start step ``step`` of run ``seed`` from (coupled runs)."""
    return 1_000_003 * (seed + 1) + step


def draw_by_multinomial(probs):
    """(B, V) probabilities -> (B,) tokens by ``torch.multinomial``, as ``model.generate`` draws:
    the same distribution as pg_lm's inverse-CDF :func:`pg_lm.lm.sampling.draw`, but from an
    exponential per vocabulary entry (the largest p / E wins), so a tiny change in ``probs``
    changes the token only where two entries nearly tie. Inverse CDF on one uniform is not
    robust so: a ~1e-6 shift of the cumulative sum moves the pick across runs of tail tokens."""
    return torch.multinomial(probs, 1).squeeze(1)


def couple_pg_lm(seed: int, record: list) -> None:
    """pg_lm's trainers: each rollout's sampling starts from ``crn_seed(seed, step)`` and draws
    with :func:`draw_by_multinomial`; its completion token ids (through EOS, per row) are
    appended to ``record``."""
    import pg_lm.lm.sampling as sampling
    import pg_lm.lm.trainer as trainer_module

    inner = trainer_module.sample
    sampling.draw = draw_by_multinomial

    def coupled(*a, **kw):
        torch.manual_seed(crn_seed(seed, len(record)))
        batch = inner(*a, **kw)
        record.append([row[:n] for row, n in zip(batch.completion_ids.tolist(), batch.lengths.tolist())])
        return batch

    trainer_module.sample = coupled


def couple_trl(trainer, seed: int, record: list) -> None:
    """TRL's ``trainer``: each ``_generate`` starts from ``crn_seed(seed, step)``; its completion
    token ids are appended to ``record``. TRL itself is unchanged."""
    inner = trainer._generate

    @functools.wraps(inner)
    def coupled(prompts):
        torch.manual_seed(crn_seed(seed, len(record)))
        out = inner(prompts)
        record.append([list(ids) for ids in out[1]])  # (prompt_ids, completion_ids, ...)
        return out

    trainer._generate = coupled


class CallTimer:
    """Wraps ``obj.name`` (an instance attribute) to add the seconds spent in it to ``total``."""

    def __init__(self, obj, name: str):
        self.total, self.calls = 0.0, 0
        inner = getattr(obj, name)

        @functools.wraps(inner)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, name, timed)

    def take(self) -> float:
        """Seconds since the last ``take``."""
        out, self.total = self.total, 0.0
        return out


@torch.no_grad()
def greedy_accuracy(lm, tokenizer, bf16: bool, batch_size: int = 50) -> float:
    """Held-out greedy accuracy: pg_lm's own ``sample(greedy=True)`` (chat template, 16 new
    tokens) and ``exact_match`` on the first ``NUM_EVAL`` held-out prompts -- what pg_lm's
    ``Trainer.evaluate`` does, run identically on either library's model. ``bf16``: under
    bf16 autocast, as the library trains."""
    from pg_lm.lm.sampling import sample

    _, held_out = arithmetic_datasets(num_eval=NUM_EVAL)
    was_training, correct = lm.training, 0.0
    lm.eval()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for i in range(0, len(held_out), batch_size):
        rows = held_out.select(range(i, min(i + batch_size, len(held_out))))
        with ctx:
            batch = sample(lm, tokenizer, rows["prompt"], {}, 1, EVAL_NEW_TOKENS, greedy=True, chat_template=True)
        correct += sum(exact_match(batch.prompts, batch.completions, answer=rows["answer"]))
    lm.train(was_training)
    return correct / len(held_out)
