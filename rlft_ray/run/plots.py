"""Line plots written as PNG files (learning curves of a run, metric curves of a search)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlft_ray.core.fileio import atomic_write
from rlft_ray.run.metrics import read_metrics

#: One line: ``(label or None, x values, y values)``.
Curve = tuple[str | None, Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def plot_curves(
    path: Path, curves: Sequence[Curve], xlabel: str, ylabel: str, title: str
) -> Path | None:
    """Draw ``curves`` into the PNG ``path`` (written atomically); None if there is nothing to draw.

    Args:
        path: Output file (``.png``).
        curves: The lines; labelled ones get a legend, and a line of one point gets a marker.
        xlabel: Axis label. ylabel: Axis label. title: Plot title.
    """
    curves = [c for c in curves if len(c[1])]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5) if len(curves) > 1 else (6, 4))
    for label, x, y in curves:
        ax.plot(x, y, label=label, marker="." if len(curves) > 1 or len(x) == 1 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(label for label, _, _ in curves):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_curve(
    output_dir: Path,
    y_key: str = "rollout/episode_return_mean",
    x_key: str = "counters/env_steps",
    name: str = "return_curve.png",
) -> Path | None:
    """PNG of ``y_key`` against ``x_key`` from ``metrics.jsonl``; None if there is nothing to plot."""
    rows = [r for r in read_metrics(output_dir) if y_key in r and x_key in r]
    curve = (None, [r[x_key] for r in rows], [r[y_key] for r in rows])
    return plot_curves(output_dir / name, [curve], x_key, y_key, output_dir.name)
