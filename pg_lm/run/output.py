"""What every run leaves in its ``--output-dir``: config, metrics, samples, summary, plot.

Files are appended line by line and flushed, so a run that dies keeps what it logged.
Only the main process writes (pass ``enabled=False`` elsewhere).

A fresh run (not ``--resume``) starts with empty logs; a resumed run first cuts them back to its
checkpoint's step (:func:`trim_logs`), then appends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable


# the line-per-row logs: emptied by a fresh run, cut back to the checkpoint's step by a resumed one
LOGS = ("metrics.jsonl", "samples.jsonl", "samples_tokens.jsonl")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


class RunWriter:
    """Writes ``config.json``, ``metrics.jsonl``, ``samples.jsonl`` (and ``samples_tokens.jsonl``),
    ``summary.json`` and plots.

    ``trackers`` is an optional callable ``(metrics: dict, step: int) -> None`` (e.g.
    ``accelerator.log``) that receives every metrics row too (TensorBoard / W&B).
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, trackers=None, resume: bool = False):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.trackers = trackers
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run starts fresh logs; --resume appends
                for name in LOGS:
                    (self.dir / name).unlink(missing_ok=True)

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(json.dumps({k: _jsonable(v) for k, v in obj.items()}, indent=2) + "\n")
            tmp.replace(self.dir / name)  # atomic: a crash never leaves half a file

    def _append(self, name: str, rows: Iterable[dict]) -> None:
        if self.enabled:
            with open(self.dir / name, "a") as f:
                for row in rows:
                    f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def log(self, metrics: dict, step: int) -> None:
        """One JSON object per log step: ``{"step": step, **metrics}``."""
        self._append("metrics.jsonl", [{"step": step, **metrics}])
        if self.enabled and self.trackers is not None:
            self.trackers({k: _jsonable(v) for k, v in metrics.items()}, step=step)

    def samples(self, rows: list[dict], name: str = "samples.jsonl") -> None:
        """Sample rows (each with its ``step``) appended to ``name``, one of :data:`LOGS`."""
        self._append(name, rows)

    def read_metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def plot(self, key: str, filename: str, x_key: str = "step", title: str | None = None,
             extra: dict[str, list[tuple[float, float]]] | None = None) -> None:
        """Plot ``key`` against ``x_key`` from ``metrics.jsonl`` (plus ``extra`` named series)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.read_metrics() if r.get(key) is not None and x_key in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if rows:
            ax.plot([r[x_key] for r in rows], [r[key] for r in rows], label=key)
        for name, pts in (extra or {}).items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        ax.set_title(title or key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / filename, dpi=100)
        plt.close(fig)


def trim_logs(output_dir: str, step: int) -> None:
    """Drop the rows of every :data:`LOGS` file after ``step`` (written by a run that died before
    its next checkpoint): a resumed run redoes those steps and logs them again."""
    for name in LOGS:
        path = Path(output_dir) / name
        if not path.exists():
            continue
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if _step(ln) <= step]
        if len(keep) < len(lines):
            tmp = path.with_name(name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)


def _step(line: str) -> float:
    """The step of a log line; a line cut short by a kill is past every checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
