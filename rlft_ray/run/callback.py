"""The run directory: config, metrics.jsonl, summary.json, plots, best/last checkpoints.

Layout of ``--output-dir`` (Ray Train's experiment directory is the same folder)::

    config.yaml          resolved run config
    metrics.jsonl        one JSON object per iteration (namespaced keys)
    summary.json         wall_s, env_steps, episode_return_mean, policy_version, ...
    return_curve.png     return against env steps
    checkpoint_best/     best checkpoint so far (by the learner's score metric)
    checkpoint_last/     latest checkpoint
    tensorboard/         TensorBoard event files of every metric (tracking.tensorboard)
    ray_train/           Ray Train's storage for this attempt (its own checkpoint copies)
    .lock                who writes the directory now (host, pid): one writer at a time

The run directory, not Ray Train's storage, decides what ``--resume`` restores: its
``checkpoint_last`` and the ``metrics.jsonl`` rows up to that checkpoint's iteration.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, UserCallback

from rlft_ray.core.fileio import atomic_write_json, replace_dir
from rlft_ray.run.metrics import METRICS_FILE, ROWS_KEY
from rlft_ray.run.tensorboard import TensorBoardLog


class RunDirCallback(UserCallback):
    """Runs in the Ray Train controller (on the driver's node): writes metrics (and their
    TensorBoard copy) and keeps ``checkpoint_best`` / ``checkpoint_last`` up to date,
    atomically.

    A checkpoint's score is the ``score_metric`` of its own iteration for a held-out
    (``eval/``) metric, the loop checkpointing every evaluation; for a training metric it
    is the mean over the last ``window`` iterations' values, so one lucky batch of a
    noisy reward does not choose ``checkpoint_best``.

    Args:
        output_dir: The run directory.
        score_metric: Metric ranking checkpoints (higher is better).
        tensorboard: The config's YAML to log with TensorBoard scalars
            (``tracking.tensorboard``); None: no TensorBoard files.
        window: Iterations a training metric is averaged over.
    """

    def __init__(
        self,
        output_dir: str,
        score_metric: str,
        tensorboard: str | None = None,
        window: int = 10,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.score_metric = score_metric
        self.held_out = score_metric.startswith("eval/")
        self.recent: deque[float] = deque(maxlen=1 if self.held_out else window)
        self.tensorboard = (
            TensorBoardLog(self.output_dir, tensorboard, score_metric) if tensorboard else None
        )

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
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if self.tensorboard is not None:
            self.tensorboard.write(rows)
        for r in rows:
            value = r.get(self.score_metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.recent.append(float(value))
        if checkpoint is None:
            return
        self._materialize(checkpoint, "checkpoint_last")
        measured = self.score_metric in row if self.held_out else bool(self.recent)
        score = sum(self.recent) / len(self.recent) if measured else None
        if score is not None and score > self._best_score():
            dest = self._materialize(checkpoint, "checkpoint_best")
            atomic_write_json(
                dest / "score.json",
                {
                    "metric": self.score_metric,
                    "value": score,
                    "iteration": row.get("counters/iteration"),
                    "averaged_over": len(self.recent),
                },
            )

    def _materialize(self, checkpoint: Checkpoint, name: str) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.output_dir))
        try:
            checkpoint.to_directory(str(tmp))
        except BaseException:  # disk full, interrupted: the previous copy stays whole
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        dest = self.output_dir / name
        replace_dir(tmp, dest)
        return dest
