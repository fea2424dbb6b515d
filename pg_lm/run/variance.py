"""``pg-lm variance``'s measurement, shared by both backends: K batches drawn at a fixed policy,
each estimator's gradient computed from the SAME batch, the moments of each (pg_lm/core/variance.py),
and the report: a markdown table (returned), ``variance.json`` and ``variance.png``.

A backend brings two functions: ``draw(i)`` samples batch ``i`` (independent draws at the fixed
policy), and ``gradients(batch, names)`` the flattened gradient (P,) of each named estimator's loss
on that batch, computed by the backend's own loss code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from pg_lm.core import gradient_summary, welford_update

Draw = Callable[[int], Any]
Gradients = Callable[[Any, list[str]], "dict[str, Tensor]"]


def measure(draw: Draw, gradients: Gradients, names: list[str], batches: int, reference: str,
            reference_batches: int, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """{estimator: {variance, mean_norm, snr, snr_debiased, cosine}} over ``batches`` (K >= 2) draws.

    The reference gradient is the mean of estimator ``reference`` over ``reference_batches`` further,
    independent draws (batches K, K+1, ...): a large-batch estimate of the true gradient that shares
    no sample with the K measured batches (0 = no reference; ``cosine`` is then left out)."""
    if batches < 2:
        raise ValueError(f"--batches must be >= 2 (a variance needs two estimates), got {batches}")
    if reference_batches < 0:
        raise ValueError(f"--reference-batches must be >= 0, got {reference_batches}")
    moments: dict[str, tuple[Tensor, float]] = {}
    for k in range(batches):
        grads = gradients(draw(k), names)
        for name in names:
            g = grads[name].double()  # (P,)
            mean, m2 = moments.get(name, (torch.zeros_like(g), 0.0))
            moments[name] = welford_update(mean, m2, k, g)
        if progress:
            progress(f"batch {k + 1}/{batches}")
    ref = None
    for k in range(reference_batches):
        g = gradients(draw(batches + k), [reference])[reference].double()
        ref = g if ref is None else ref + (g - ref) / (k + 1)
        if progress:
            progress(f"reference batch {k + 1}/{reference_batches}")
    return {name: gradient_summary(mean, m2 / (batches - 1), ref, batches) for name, (mean, m2) in moments.items()}


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else "inf" if math.isinf(x) else f"{x:.4g}"


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per estimator: total variance, norm of the mean, signal-to-noise, cosine to the reference."""
    cos = any("cosine" in r for r in results.values())
    head = ("| estimator | total variance | ‖mean‖ | SNR ‖mean‖/√var | SNR, noise removed |"
            + (" cos(mean, reference) |" if cos else ""))
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if cos else "")
    rows = [f"| {name} | {_fmt(r['variance'])} | {_fmt(r['mean_norm'])} | {_fmt(r['snr'])} "
            f"| {_fmt(r.get('snr_debiased', math.nan))} |"
            + (f" {_fmt(r.get('cosine', math.nan))} |" if cos else "") for name, r in results.items()]
    return "\n".join([head, rule, *rows])


def write_report(results: dict[str, dict[str, float]], meta: dict, out_dir: str, title: str) -> str:
    """Write ``variance.json`` (``meta`` and the results) and ``variance.png`` to ``out_dir``; return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {n: {k: (None if math.isnan(v) or math.isinf(v) else v) for k, v in r.items()} for n, r in results.items()}
    (out / "variance.json").write_text(json.dumps({**meta, "results": clean}, indent=2) + "\n")
    _plot(results, out / "variance.png", title)
    return markdown_table(results)


def _plot(results: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Bars per estimator: total variance (log scale), signal-to-noise, and the cosine to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [("variance", "total variance (log)"), ("snr_debiased", "SNR, noise removed")]
    if any("cosine" in r for r in results.values()):
        panels.append(("cosine", "cos(mean, reference)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        vals = [results[n].get(key, math.nan) for n in names]
        vals = [v if math.isfinite(v) else 0.0 for v in vals]
        ax.bar(range(len(names)), vals, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "variance" and all(v > 0 for v in vals):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
