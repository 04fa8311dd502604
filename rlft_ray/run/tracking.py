"""Experiment trackers besides TensorBoard: MLflow and Weights & Biases (offline by default).

Both are opt-in ``tracking.*`` keys and optional packages (``pip install
'rlft-ray[tracking]'``). They run in the driver, fed by :class:`TrackerFeed`, which tails
the run directory's ``metrics.jsonl`` (what the Ray Train controller writes) the same way
the progress bar does: the driver sees the whole run, so it can close each tracker's run
with the run's final status, and the run ids it keeps in ``tracking.json`` let a
``--resume`` log into the same MLflow / W&B run.

A tracker never fails a run: what can be checked before Ray (the package is installed, a
file store can be written) is a :class:`~rlft_ray.config.ConfigError` naming the key; an
error later (server unreachable, disk full) is reported once and that tracker stops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlft_ray.config import ConfigError, RunConfig, TrackingConfig, flat_dict, to_dict
from rlft_ray.core.fileio import atomic_write_json
from rlft_ray.run.metrics import MetricsTail, read_metrics

logger = logging.getLogger(__name__)

#: Run ids of the trackers, kept in the run directory for ``--resume``.
IDS_FILE = "tracking.json"
#: Iteration counter used as every tracker's step.
STEP_KEY = "counters/iteration"
#: Longest wait for the trackers when the run ends.
CLOSE_TIMEOUT_S = 30


def mlflow_store_path(uri: str) -> Path | None:
    """The local directory of a file-store MLflow URI (``file:./mlruns``, ``file:///x``
    or a plain path); None for servers and databases (``http://``, ``sqlite://``, ...)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path((parsed.netloc + parsed.path) or ".").expanduser().resolve()
    # no scheme: a path when it looks like one ("databricks", "uc" are MLflow backends)
    looks_like_path = "/" in uri or os.sep in uri or uri.startswith((".", "~"))
    if (parsed.scheme == "" and looks_like_path) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri).expanduser().resolve()
    return None


def _writable(path: Path) -> bool:
    """Whether ``path`` exists writable, or can be created under its nearest existing parent."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_tracking(tracking: TrackingConfig) -> TrackingConfig:
    """Before Ray starts: the tracker packages are installed and a file store can be
    written. Returns ``tracking`` with a file store's URI made absolute.

    Raises:
        ConfigError: Naming ``tracking.mlflow_uri`` or ``tracking.wandb_project``.
    """
    if tracking.mlflow_uri is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "tracking.mlflow_uri",
                "MLflow tracking needs the mlflow package: pip install 'rlft-ray[tracking]'",
            ) from exc
        store = mlflow_store_path(tracking.mlflow_uri)
        if store is not None:
            if not _writable(store):
                raise ConfigError(
                    "tracking.mlflow_uri", f"{tracking.mlflow_uri}: {store} cannot be written"
                )
            tracking = replace(tracking, mlflow_uri=store.as_uri())
            # asked for explicitly: MLflow 3 refuses file stores unless this is set
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # a server that is down: a few short retries, not MLflow's default of ~2 minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if tracking.wandb_project is not None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(
                "tracking.wandb_project",
                "Weights & Biases tracking needs the wandb package: pip install 'rlft-ray[tracking]'",
            ) from exc
        if tracking.wandb_mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ConfigError(
                "tracking.wandb_mode",
                "online needs W&B credentials (`wandb login` or WANDB_API_KEY); "
                "offline writes the run to wandb/ for a later `wandb sync`",
            )
        # read by wandb itself (Ray Tune's callback checks the key unless this says offline)
        os.environ.setdefault("WANDB_MODE", tracking.wandb_mode)
    return tracking


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as dotted keys (``grpo.optim.lr``), the trackers' parameters."""
    return flat_dict(to_dict(cfg))


def _step(row: dict[str, Any]) -> int:
    return int(row.get(STEP_KEY, 0))


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    }


class MLflowTracker:
    """One MLflow run per run directory: the config as parameters, every metric per step.

    Args:
        uri: Tracking URI, as :func:`check_tracking` returned it (which also sets MLflow's
            environment: file stores allowed, short HTTP retries).
        experiment: Experiment name (created when missing).
        run_name: The run's name (the run directory's name).
        run_id: Continue this run (``--resume``), else start one.
    """

    name = "MLflow"

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_config(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # a resume re-logs nothing
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, _step(row)) for row in rows for k, v in _numbers(row).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, status: str) -> None:
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)


class WandbTracker:
    """One Weights & Biases run per run directory, offline by default (files under
    ``wandb/`` in the run directory; ``wandb sync`` uploads them later).

    Args:
        project: W&B project.
        mode: ``offline`` or ``online``.
        directory: The run directory (``wandb/`` goes inside).
        run_name: The run's name.
        run_id: Continue this run (``--resume``), else start one.
    """

    name = "Weights & Biases"

    def __init__(
        self, project: str, mode: str, directory: Path, run_name: str, run_id: str | None
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_name,
            dir=str(directory),
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", silent=True, init_timeout=30),
        )
        self.run_id = self.run.id

    def log_config(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.run.log(_numbers(row), step=_step(row))

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class TrackerFeed:
    """Forwards the run directory's new metric rows to the configured trackers, from a
    driver thread (every ``interval`` seconds) and once more at :meth:`close`.

    Args:
        output_dir: The run directory.
        cfg: The run config (``tracking``; the whole config is logged as parameters).
        interval: Seconds between polls of ``metrics.jsonl``.
    """

    def __init__(self, output_dir: Path, cfg: RunConfig, interval: float = 2.0) -> None:
        self.output_dir = Path(output_dir)
        self.cfg = cfg
        self.interval = interval
        # a resume starts after the rows kept; rows re-run after a learner restart (same
        # iterations again) are not re-sent: W&B refuses lower steps, MLflow would hold both
        self.sent = max((_step(r) for r in read_metrics(self.output_dir)), default=0)
        self.tail = MetricsTail(self.output_dir, from_end=True)
        self.status = "failed"
        self.trackers: list[Any] = []
        self.stop = threading.Event()
        # Trackers start on the thread: a slow server delays the trackers, never the run.
        self.thread = threading.Thread(target=self._run, daemon=True, name="tracker-feed")
        self.thread.start()

    @staticmethod
    def wanted(cfg: RunConfig) -> bool:
        """Whether ``cfg`` asks for any driver-side tracker."""
        return cfg.tracking.mlflow_uri is not None or cfg.tracking.wandb_project is not None

    def _start_trackers(self) -> None:
        t = self.cfg.tracking
        ids_file = self.output_dir / IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        name = self.output_dir.name
        makers: list[tuple[str, Any]] = []
        if t.mlflow_uri is not None:
            makers.append(
                (
                    "mlflow",
                    lambda: MLflowTracker(
                        t.mlflow_uri, t.mlflow_experiment, name, ids.get("mlflow")
                    ),
                )
            )
        if t.wandb_project is not None:
            makers.append(
                (
                    "wandb",
                    lambda: WandbTracker(
                        t.wandb_project, t.wandb_mode, self.output_dir, name, ids.get("wandb")
                    ),
                )
            )
        params = flat_config(self.cfg)
        for key, make in makers:
            try:
                tracker = make()
                tracker.log_config(params)
            except Exception as exc:  # unreachable server, bad credentials: the run goes on
                logger.warning(
                    "%s tracking is off for this run: %s: %s", key, type(exc).__name__, exc
                )
                continue
            ids[key] = tracker.run_id
            self.trackers.append(tracker)
        if self.trackers:
            atomic_write_json(ids_file, ids)

    def _run(self) -> None:
        self._start_trackers()
        while not self.stop.wait(self.interval):
            self.flush()
        self.flush()
        self._each("finish", self.status)

    def flush(self) -> None:
        """Send the rows of iterations not sent yet."""
        new = [r for r in self.tail.new_rows() if _step(r) > self.sent]
        if new:
            self.sent = max(_step(r) for r in new)
            self._each("log", new)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # warn once, then this tracker is off
                self.trackers.remove(tracker)
                logger.warning("%s logging stopped: %s: %s", tracker.name, type(exc).__name__, exc)

    def close(self, status: str) -> None:
        """Send the last rows and end each tracker's run with ``status``
        (``completed`` / ``failed`` / ``interrupted``)."""
        self.status = status
        self.stop.set()
        self.thread.join(timeout=CLOSE_TIMEOUT_S)  # it sends the last rows, then finishes
        if self.thread.is_alive():
            logger.warning(
                "experiment trackers did not finish within %d s; their last rows may be missing",
                CLOSE_TIMEOUT_S,
            )
