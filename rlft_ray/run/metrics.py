"""The run directory's records: ``metrics.jsonl`` (one row per iteration) and ``summary.json``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from rlft_ray.core.fileio import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.jsonl"


#: Key under which a report carries every iteration's row since the previous report.
ROWS_KEY = "_rows"


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (skipping a torn last line)."""
    path = Path(output_dir) / METRICS_FILE
    return _parse_rows(path.read_bytes().splitlines()) if path.is_file() else []


def _parse_rows(lines: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return rows


class MetricsTail:
    """The rows appended to ``metrics.jsonl`` since the previous :meth:`new_rows`, read
    incrementally: the driver's readers (progress bar, trackers) poll while the learner
    may run in the same process, and parsing the whole file each time takes its time.
    ``from_end``: start after the rows already written (a resume's earlier rows)."""

    def __init__(self, output_dir: Path, from_end: bool = False) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.file, size = self._stat()
        self.offset = size if from_end else 0

    def _stat(self) -> tuple[int | None, int]:
        st = self.path.stat() if self.path.is_file() else None
        return (st.st_ino, st.st_size) if st else (None, 0)

    def new_rows(self) -> list[dict[str, Any]]:
        """Whole rows written since the last call (a torn last line is read next time). A
        file a learner restart rewrote (atomically: a new file) is read from its start."""
        file, size = self._stat()
        if file != self.file or size < self.offset:
            self.file, self.offset = file, 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1
        self.offset += end
        return _parse_rows(data[:end].splitlines())


def truncate_metrics(output_dir: Path, last_iteration: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from."""
    rows = [r for r in read_metrics(output_dir) if r.get("counters/iteration", 0) <= last_iteration]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(output_dir / METRICS_FILE, text)


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
    score = output_dir / "checkpoint_best" / "score.json"
    if score.is_file():  # which metric chose checkpoint_best, its value and iteration
        with contextlib.suppress(ValueError, OSError):
            summary["checkpoint_best_score"] = json.loads(score.read_text())
    summary.update(extra or {})
    atomic_write_json(output_dir / "summary.json", summary)
    return summary
