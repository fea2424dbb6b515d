"""Prompt datasets from files, folders or dataset names, checked before any model is loaded.

``--dataset`` takes a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder, or a name
``datasets.load_dataset`` accepts (local files need no network). The prompt column (``--prompt-column``)
is renamed ``prompt``; it holds strings or lists of chat messages (``[{"role": ..., "content": ...}]``).
Every other column reaches the reward functions. See docs/data-and-rewards.md.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_dataset(dataset, what: str, column: str = "prompt", flag: str = "") -> None:
    """A ``ValueError`` when the ``what`` dataset (e.g. "training") is empty or has no ``column``
    (naming the columns it has). ``flag`` (e.g. "--dataset data.jsonl") says where it came from."""
    source = f" ({flag})" if flag else ""
    if len(dataset) == 0:
        raise ValueError(f"the {what} dataset{source} is empty")
    if column not in dataset.column_names:
        hint = " (choose one with --prompt-column)" if flag else ""
        raise ValueError(f"the {what} dataset{source} has no {column!r} column{hint}; it has: "
                         f"{', '.join(dataset.column_names)}")


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FILE_TYPES or spec.startswith(("/", "./", "../", "~"))


def load_prompts(spec: str, split: str, prompt_column: str = "prompt", what: str = "training", flag: str = "--dataset"):
    """The ``split`` of dataset ``spec`` with its ``prompt_column`` renamed ``prompt``, checked
    (:func:`check_dataset`). A missing file, or a name that cannot be loaded, is a one-line ``ValueError``."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # "Generating train split" bars for a small file are noise before the run's own output
    try:
        ds = _load(spec, split, flag)
    finally:
        if not quiet:
            enable_progress_bars()
    where = f"{flag} {spec}"
    check_dataset(ds, what, prompt_column, where)
    if prompt_column != "prompt":
        if "prompt" in ds.column_names:
            raise ValueError(f"{where}: --prompt-column {prompt_column!r} would replace its column 'prompt'; rename one")
        ds = ds.rename_column(prompt_column, "prompt")
    return ds


def _load(spec: str, split: str, flag: str):
    import datasets

    where = f"{flag} {spec}"
    path = Path(os.path.expanduser(spec))
    try:
        if path.is_file():
            kind = FILE_TYPES.get(path.suffix.lower())
            if kind is None:
                raise ValueError(f"{where}: unknown file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")  # a single file is one split
        elif path.is_dir() or not _looks_like_path(spec):
            ds = datasets.load_dataset(str(path) if path.is_dir() else spec, split=split)
        else:
            raise ValueError(f"{where}: no such file or folder")
    except ValueError:
        raise
    except Exception as e:  # the datasets library's many errors (unknown split, no network, bad JSON): one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{where} (split {split!r}) could not be loaded: {type(e).__name__}: {first}") from None
    return ds


def datasets_from_config(cfg):
    """(train, eval or None) from ``cfg.dataset`` / ``eval_dataset`` / ``eval_split`` / ``eval_fraction``;
    (None, None) without ``cfg.dataset`` and ``cfg.eval_dataset``."""
    train = eval_ds = None
    if cfg.dataset:
        train = load_prompts(cfg.dataset, cfg.split, cfg.prompt_column)
    if cfg.eval_dataset:
        eval_ds = load_prompts(cfg.eval_dataset, cfg.eval_split or cfg.split, cfg.prompt_column, "evaluation",
                               "--eval-dataset")
    elif cfg.eval_split and cfg.dataset:
        eval_ds = load_prompts(cfg.dataset, cfg.eval_split, cfg.prompt_column, "evaluation")
    elif cfg.eval_fraction and train is not None:
        n_eval = max(1, round(len(train) * cfg.eval_fraction))
        if n_eval >= len(train):
            raise ValueError(f"--eval-fraction {cfg.eval_fraction} of {len(train)} rows leaves no training rows")
        parts = train.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    return train, eval_ds


def step_rows(n: int, per: int, seed: int, step: int, rank: int, world: int, round: int = 0) -> list[int]:
    """The dataset rows (of ``n``) that process ``rank`` of ``world`` trains on at ``step``: ``per``
    of them, from a seeded permutation per epoch, the processes taking consecutive slices. ``round``
    k > 0 (dynamic sampling's extra rounds): a permutation seeded by (seed, step, k), sliced by
    rank. A function of the step and the seed alone, so a resumed run draws the same prompts."""
    import torch

    if round:
        g = torch.Generator().manual_seed((1 << 40) + (seed * 1_000_003 + step) * 1009 + round)
        perm = torch.randperm(n, generator=g)  # host: read back as ints, the same on every process
        return [int(perm[(rank * per + k) % n]) for k in range(per)]
    idx, start = [], step * per * world + rank * per
    for k in range(start, start + per):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)  # host: read back as ints, the same on every process
        idx.append(int(perm[pos]))
    return idx
