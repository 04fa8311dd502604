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

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from ray.train import Checkpoint, UserCallback

from rlft_ray.config import RunConfig, flat_dict
from rlft_ray.core.fileio import atomic_write_json, atomic_write_text, replace_dir
from rlft_ray.run.plots import plot_curves

logger = logging.getLogger(__name__)

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


class RunDirBusyError(RuntimeError):
    """Another process writes the run directory; the message names it."""


LOCK_FILE = ".lock"


class RunDirLock:
    """One writer per run directory: ``.lock`` holds the writer's host and pid.

    Taken with ``O_CREAT | O_EXCL`` (atomic on a local or NFS filesystem). A lock whose
    holder is gone (same host, no such process) is stale and taken over; a live holder,
    or one on another host (which cannot be checked), refuses the second writer.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunDirBusyError: Naming the holder and how to clear a lock left behind.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            # written whole beside it, then linked into place: the link fails if a lock
            # exists, and a reader never sees an empty or half-written one
            tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
                    raise RunDirBusyError(
                        f"{self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} since {since} (a run, --resume or job still "
                        f"writing it); wait for it or stop it. If that process is gone, "
                        f"delete {self.path}"
                    ) from None
                if holder is not None and self._holder() != holder:
                    continue  # taken over by another process meanwhile: look again
                self.path.unlink(missing_ok=True)  # stale: the holder is gone
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            return
        raise RunDirBusyError(f"{self.path.parent}: another process took {self.path} just now")

    def release(self) -> None:
        """Drop the lock (only our own)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return {
                "host": str(holder["host"]),
                "pid": int(holder["pid"]),
                "since": float(holder["since"]),
            }
        except FileNotFoundError:
            return None  # released just now
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable (written by hand, or by an older version): nobody we can check
            return {"host": "?", "pid": -1, "since": 0.0}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if holder["host"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True  # left by an earlier run in this process
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: Leftovers of an interrupted write: a checkpoint copy being made, a file being replaced.
_TEMP_PATTERNS = (".checkpoint_last.*", ".checkpoint_best.*", ".*.tmp")


def remove_temp_files(output_dir: Path) -> list[str]:
    """Clean up after interrupted atomic writes in ``output_dir``; returns what was removed.

    A directory replacement cut between its two renames (:func:`~rlft_ray.core.fileio.replace_dir`)
    left the old copy aside and no ``checkpoint_last``: the old copy is put back first (it
    is whole, and the rows after its iteration are re-run), then every temp leftover goes.
    """
    output_dir = Path(output_dir)
    for old in output_dir.glob(".*.old-*"):
        target = output_dir / old.name[1:].split(".old-")[0]
        if old.is_dir() and not target.exists():
            os.replace(old, target)
    removed = []
    for pattern in (*_TEMP_PATTERNS, ".*.old-*"):
        for path in output_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def truncate_metrics(output_dir: Path, last_iteration: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from."""
    rows = [r for r in read_metrics(output_dir) if r.get("counters/iteration", 0) <= last_iteration]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(output_dir / METRICS_FILE, text)


TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Every metrics row as TensorBoard scalars against ``counters/iteration``, and the
    config as text, in ``tensorboard/`` of the run directory (tensorboardX's protocol
    buffers and event-file writer, which Ray Tune brings along). Events are written and
    flushed with each report, synchronously: nothing waits in a queue when the run
    ends. An attempt's file starts with a purge marker at its first iteration, so
    TensorBoard drops what an earlier attempt logged for the iterations that run again.
    A tracker never fails a run: an error is reported once and logging stops.
    """

    def __init__(self, output_dir: Path, config_text: str, score_metric: str = "") -> None:
        self.directory = Path(output_dir) / TENSORBOARD_DIR
        self.config_text = config_text
        self.score_metric = score_metric
        self.writer: Any = None
        self.failed = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Log ``rows`` (one per iteration) and flush."""
        if self.failed or not rows:
            return
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            if self.writer is None:
                first = int(rows[0].get("counters/iteration", 1))
                self.directory.mkdir(parents=True, exist_ok=True)
                self.writer = EventsWriter(str(self.directory / "events"))
                self.writer.write_event(
                    Event(step=first, session_log=SessionLog(status=SessionLog.START))
                )
                text = summary.text("config", f"```yaml\n{self.config_text}\n```")
                self.writer.write_event(Event(step=first, wall_time=time.time(), summary=text))
                for part in self._hparams(summary):  # HParams tab: the config, the score
                    self.writer.write_event(Event(step=first, wall_time=time.time(), summary=part))
            for row in rows:
                step = int(row.get("counters/iteration", 0))
                for key, value in row.items():
                    number = isinstance(value, (int, float)) and not isinstance(value, bool)
                    if number and math.isfinite(value):
                        event = Event(step=step, wall_time=time.time())
                        event.summary.CopyFrom(summary.scalar(key, float(value)))
                        self.writer.write_event(event)
            self.writer.flush()
        except Exception as exc:  # disk full, no tensorboardX: the run goes on
            self.failed = True
            logger.warning("TensorBoard logging stopped: %s: %s", type(exc).__name__, exc)

    def _hparams(self, summary: Any) -> tuple[Any, ...]:
        """The config's fields (dotted keys; lists as text) for TensorBoard's HParams tab,
        with the run's score metric as its metric column."""
        values = flat_dict(yaml.safe_load(self.config_text) or {})
        params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()
        }
        exp, ssi, _ = summary.hparams(params, {self.score_metric: None})
        return exp, ssi


class RunDirCallback(UserCallback):
    """Runs in the Ray Train controller (on the driver's node): writes metrics (and their
    TensorBoard copy) and keeps ``checkpoint_best`` / ``checkpoint_last`` up to date,
    atomically.

    Args:
        output_dir: The run directory.
        score_metric: Metric ranking checkpoints (higher is better).
        tensorboard: The config's YAML to log with TensorBoard scalars
            (``tracking.tensorboard``); None: no TensorBoard files.
    """

    def __init__(self, output_dir: str, score_metric: str, tensorboard: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.score_metric = score_metric
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
        try:
            checkpoint.to_directory(str(tmp))
        except BaseException:  # disk full, interrupted: the previous copy stays whole
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


#: Whether this process exists for one run (the ``rlft-ray`` command): only then does the
#: start-up breakdown count from the process's start (imports included).
_COUNT_FROM_PROCESS_START = [False]


def count_from_process_start() -> None:
    """Called by the CLI: this process runs one command, so its start is the run's start."""
    _COUNT_FROM_PROCESS_START[0] = True


class StartupMarks:
    """Where a run's wall time goes outside its iterations: process start (imports) ->
    checks -> Ray -> actors -> the first iteration's start (Train controller, worker group,
    learner, restore, first weight sync) ... the last iteration's end -> training returned.
    The driver puts :meth:`breakdown` into ``summary.json`` as ``startup``."""

    def __init__(self) -> None:
        age = process_age_s() if _COUNT_FROM_PROCESS_START[0] else None
        now = time.time()
        self.process_start = now - age if age is not None else None
        self.points: list[tuple[str, float]] = [("imports", now)]

    def mark(self, name: str) -> None:
        """The phase ``name`` ends now."""
        self.points.append((name, time.time()))

    def breakdown(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Seconds per phase; ``to_first_iteration_s`` from process start (or from the
        driver's start where the process start is unknown)."""
        origin = self.process_start if self.process_start is not None else self.points[0][1]
        out: dict[str, float] = {}
        prev = origin
        for name, at in self.points:
            if name == "training":
                break
            out[f"{name}_s"] = round(at - prev, 3)
            prev = at
        mine = [r for r in rows if r.get("time/unix", 0.0) >= self.points[0][1]]
        end = dict(self.points).get("training")
        if mine and end is not None:
            first = mine[0]["time/unix"] - mine[0].get("perf/iteration_s", 0.0)
            out["train_start_s"] = round(first - prev, 3)  # controller, workers, learner
            out["iterations_s"] = round(mine[-1]["time/unix"] - first, 3)
            out["train_end_s"] = round(end - mine[-1]["time/unix"], 3)
            out["to_first_iteration_s"] = round(first - origin, 3)
        return out


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
