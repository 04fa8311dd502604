"""The driver's live progress bar over ``metrics.jsonl``."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from rlft_ray.config import RunConfig
from rlft_ray.run.metrics import MetricsTail


class ProgressBar:
    """Driver-side live progress: tails ``metrics.jsonl`` (written by the controller)."""

    def __init__(self, output_dir: Path, cfg: RunConfig, score_metric: str) -> None:
        from tqdm.auto import tqdm

        self.output_dir = output_dir
        self.score_metric = score_metric
        # Count iterations when they bound the run (LM runs), else environment steps.
        by_iter = cfg.total_iterations is not None
        self.x_key = "counters/iteration" if by_iter else "counters/env_steps"
        self.bar = tqdm(
            total=cfg.total_iterations if by_iter else cfg.total_env_steps,
            unit="it" if by_iter else "step",
            dynamic_ncols=True,
            mininterval=0.5 if os.isatty(2) else 10.0,
        )
        self.tail = MetricsTail(output_dir, from_end=True)  # not a resume's earlier rows
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._refresh()

    def _last_new_row(self) -> dict[str, Any] | None:
        """The last whole row written since the previous call."""
        rows = self.tail.new_rows()
        return rows[-1] if rows else None

    def _refresh(self) -> None:
        last = self._last_new_row()
        if last is None:
            return
        self.bar.n = int(last.get(self.x_key, 0))
        score = last.get(self.score_metric)
        self.bar.set_postfix(
            it=int(last.get("counters/iteration", 0)),
            **{
                self.score_metric.rsplit("/", 1)[-1][:8]: f"{score:.3g}"
                if score is not None
                else "-"
            },
            sps=f"{last.get('perf/env_steps_per_s', 0):.0f}",
            refresh=False,
        )
        self.bar.update(0)  # redraws at most every `mininterval` (10 s when not a terminal)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self._refresh()
        self.bar.close()
