"""The run directory: config, metrics.jsonl, summary.json, plots, best/last checkpoints.

Layout of ``--output-dir`` (Ray Train's experiment directory is the same folder)::

    config.yaml          resolved run config
    metrics.jsonl        one JSON object per iteration (namespaced keys)
    summary.json         wall_s, env_steps, episode_return_mean, policy_version, ...
    return_curve.png     return against env steps
    checkpoint_best/     best checkpoint so far (by the learner's score metric)
    checkpoint_last/     latest checkpoint
    checkpoint_<time>/   Ray Train's own copies (the last `keep_checkpoints`)
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, UserCallback

from rlft_ray.fileio import atomic_write_json, atomic_write_text, replace_dir
from rlft_ray.plots import plot_curves

METRICS_FILE = "metrics.jsonl"
#: Key under which a report carries every iteration's row since the previous report.
ROWS_KEY = "_rows"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (skipping a torn last line)."""
    path = Path(output_dir) / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(output_dir: Path, last_iteration: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from."""
    rows = [r for r in read_metrics(output_dir) if r.get("counters/iteration", 0) <= last_iteration]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(output_dir / METRICS_FILE, text)


class RunDirCallback(UserCallback):
    """Runs in the Ray Train controller (on the driver's node): writes metrics and keeps
    ``checkpoint_best`` / ``checkpoint_last`` up to date, atomically.

    Args:
        output_dir: The run directory.
        score_metric: Metric ranking checkpoints (higher is better).
    """

    def __init__(self, output_dir: str, score_metric: str) -> None:
        self.output_dir = Path(output_dir)
        self.score_metric = score_metric
        self._last_iteration: float | None = None

    def _best_score(self) -> float:
        score_file = self.output_dir / "checkpoint_best" / "score.json"
        if score_file.is_file():
            return float(json.loads(score_file.read_text())["value"])
        return -math.inf

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None
    ) -> None:
        # Pop the rows so later callbacks (Tune) see only the flat latest metrics.
        rows = metrics[0].pop(ROWS_KEY, None) or [metrics[0]]
        row = metrics[0]
        first = rows[0].get("counters/iteration")
        if first is not None and self._last_iteration is not None and first <= self._last_iteration:
            # Ray Train restarted the workers from the last checkpoint (max_failures):
            # the iterations after it run again, so drop their earlier rows.
            truncate_metrics(self.output_dir, int(first) - 1)
        self._last_iteration = rows[-1].get("counters/iteration", self._last_iteration)
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if checkpoint is None:
            return
        self._materialize(checkpoint, "checkpoint_last")
        score = row.get(self.score_metric)
        if score is not None and score > self._best_score():
            dest = self._materialize(checkpoint, "checkpoint_best")
            atomic_write_json(
                dest / "score.json",
                {
                    "metric": self.score_metric,
                    "value": score,
                    "iteration": row.get("counters/iteration"),
                },
            )

    def _materialize(self, checkpoint: Checkpoint, name: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.output_dir))
        checkpoint.to_directory(str(tmp))
        dest = self.output_dir / name
        replace_dir(tmp, dest)
        return dest


def write_summary(
    output_dir: Path, wall_s: float, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``summary.json`` from the last metrics row; returns it."""
    rows = read_metrics(output_dir)
    last = rows[-1] if rows else {}
    summary: dict[str, Any] = {
        "wall_s": round(wall_s, 2),
        "iterations": int(last.get("counters/iteration", 0)),
        "env_steps": int(last.get("counters/env_steps", 0)),
        "episode_return_mean": last.get("rollout/episode_return_mean"),
        "success_rate": last.get("rollout/success_rate"),
        "policy_version": int(last.get("counters/policy_version", 0)),
        "checkpoint_best": str(output_dir / "checkpoint_best")
        if (output_dir / "checkpoint_best").exists()
        else None,
        "checkpoint_last": str(output_dir / "checkpoint_last")
        if (output_dir / "checkpoint_last").exists()
        else None,
    }
    summary.update(extra or {})
    atomic_write_json(output_dir / "summary.json", summary)
    return summary


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
