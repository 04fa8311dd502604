"""One run's Ray Train attempts: the first, restarts from ``checkpoint_last`` after a
failure (``resources.max_failures``; deterministic failures are not retried), and the
signals (SIGINT / SIGTERM) that stop them. Used by :mod:`rlft_ray.run.driver`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rlft_ray.config import ConfigError, RunConfig, config_yaml
from rlft_ray.core.errors import DeterministicError
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import Learner, TaskProbe
from rlft_ray.rollout.shared_weights import SLOTS, SharedWeights
from rlft_ray.run.callback import RunDirCallback
from rlft_ray.run.lock import remove_temp_files
from rlft_ray.run.loop import LOOP_CFG, train_loop_per_worker
from rlft_ray.run.metrics import truncate_metrics
from rlft_ray.run.ray_session import NO_DASHBOARD_ENV, embedded_here, learner_in_driver_wanted

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run could not start or stopped with an error; the message says why and what was kept."""


class RunInterrupted(RunError):
    """SIGINT / SIGTERM (Ctrl-C, ``ray job stop``) stopped the run; ``summary.json`` says
    ``status: interrupted`` and ``--resume`` continues from ``checkpoint_last``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class Interrupt(BaseException):
    """SIGINT / SIGTERM in the driver (a BaseException: nothing on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class RunSignals:
    """SIGINT / SIGTERM (Ctrl-C, ``ray job stop``) during a run, in the main thread (a Tune
    trial runs in a thread; Tune handles its signals). Before training they raise
    :class:`Interrupt`; during it they ask the attempt to abort
    (:meth:`Attempts.on_signal`); while the summary is written they are only noted."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.attempts: Attempts | None = None
        self.finishing = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> RunSignals:
        return self.install()

    def install(self) -> RunSignals:
        """Take the signals (again after ``ray.init``, whose fatal-signal handler takes
        SIGTERM and aborts the process)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handle)
                self._old.setdefault(sig, previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._old.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        if self.finishing:
            return
        if self.attempts is None or not first:  # a second signal stops waiting
            raise Interrupt(signum)
        self.attempts.on_signal(signum)

    def raise_if_interrupted(self, when: str) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived (whatever it made Ray raise)."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise RunInterrupted(self.signum, f"interrupted by {name} {when}") from None


class LearnerFailed(RuntimeError):
    """The learner raised while running in the driver (Ray Train's local mode). It holds
    the error as ``worker_failures``, like Ray Train's ``WorkerGroupError``, so a failure
    is reported and retried the same way wherever the learner ran."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.worker_failures = {0: error}


class _DeferSignals:
    """The run directory's callback as the learner in the driver calls it: a signal that
    arrives while it writes metrics or a checkpoint stops the run once the write is done
    (in a Train worker, the controller calls the callback and the signal aborts the
    workers instead)."""

    def __init__(self, callback: RunDirCallback, attempts: Attempts) -> None:
        self.callback, self.attempts = callback, attempts

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        self.attempts.reporting = True
        try:
            self.callback.after_report(run_context, metrics, checkpoint)
        finally:
            self.attempts.reporting = False
        if self.attempts.signum is not None:
            raise Interrupt(self.attempts.signum)


class _Trainer(TorchTrainer):
    """``TorchTrainer`` that keeps its controller's handle, so an interrupt can abort it,
    and leaves SIGINT to the run (Ray's own handler exits 0 without a summary). It leaves
    out callbacks with nothing to do, each one more actor process to start: Ray Data's
    dataset manager when no Ray Dataset is passed, and, on a local instance without a
    dashboard, the placement-group cleaner (it polls the dashboard's state API, a warning a
    second without it; the instance's placement groups end with it anyway)."""

    controller: Any = None

    def _register_sigint_handler(self, controller: Any) -> None:
        self.controller = controller

    def _create_default_callbacks(self) -> list[Any]:
        skip = {"DatasetsCallback"} if not self.datasets else set()  # its actor: a process
        if os.environ.get(NO_DASHBOARD_ENV):
            skip.add("PlacementGroupCleanerCallback")
        return [c for c in super()._create_default_callbacks() if type(c).__name__ not in skip]


class Attempts:
    """The Ray Train attempts of one run: the first, then a restart after each worker
    failure (up to ``resources.max_failures``), always from the run directory's
    ``checkpoint_last`` (never Ray Train's storage, so a fresh run can't pick up a foreign
    checkpoint). A deterministic failure (NaN loss, reward function error, bad data or
    checkpoint) would fail the same way again and is not retried.

    On Ray this process started, with no Tune trial reporting (``callbacks``) and no table
    too large to pass whole (no Ray Dataset), one CPU learner runs in this process, in Ray
    Train's local mode (``resources.learner_in_driver``).
    """

    def __init__(
        self,
        cfg: RunConfig,
        probe: TaskProbe,
        runners: list[Any],
        output_dir: Path,
        learner_cls: type[Learner],
        callbacks: Sequence[Any],
        start_checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        self.cfg, self.probe, self.runners, self.output_dir = cfg, probe, runners, output_dir
        self.learner_cls, self.callbacks, self.start = learner_cls, callbacks, start_checkpoint
        self.in_driver = (
            learner_in_driver_wanted(cfg.resources)
            and embedded_here()
            and not callbacks
            and not any(_streams(t) for t in probe.datasets.values())  # no Ray Dataset
        )
        slots = SLOTS if cfg.async_rollouts else 1  # one copy of a real model, not three
        self.shared = SharedWeights(slots=slots) if self.in_driver else None
        self.restarts = 0
        self.signum: int | None = None
        self.reporting = False  # the learner in this process writes the run directory
        self.trainer: _Trainer | None = None

    def run(self) -> BaseException | None:
        """Fit until done; returns the failure that ended the run, None on success.

        Raises:
            Interrupt: SIGINT / SIGTERM arrived (:meth:`on_signal`).
        """
        try:
            return self._run()
        finally:
            if self.shared is not None:
                self.shared.close()

    def _run(self) -> BaseException | None:
        limit = self.cfg.resources.max_failures
        while True:
            self.trainer = None  # a signal now must not go to the last attempt's controller
            self.trainer = self._trainer()
            try:
                self.trainer.fit()
            except BaseException as exc:
                if self.signum is not None:  # whatever the abort made fit() raise
                    raise Interrupt(self.signum) from None
                if self.in_driver and isinstance(exc, Exception):
                    exc = LearnerFailed(exc)  # raised by the learner itself, in this process
                if not isinstance(exc, (ray.train.TrainingFailedError, LearnerFailed)):
                    raise
                if _deterministic(exc) or (limit != -1 and self.restarts >= limit):
                    return exc
                self._before_restart(exc, limit)
                continue
            if self.signum is not None:
                raise Interrupt(self.signum)
            return None

    def _before_restart(self, exc: BaseException, limit: int) -> None:
        """Count the restart; drop rows after ``checkpoint_last`` (they run again)."""
        self.restarts += 1
        last = self.output_dir / "checkpoint_last"
        iteration = ckpt.read_state(last)["counters"]["iteration"] if last.is_dir() else 0
        logger.warning(
            "learners failed (%s); restart %d/%s from iteration %d",
            failure_cause(exc),
            self.restarts,
            "unlimited" if limit == -1 else limit,
            iteration,
        )
        truncate_metrics(self.output_dir, iteration)
        remove_temp_files(self.output_dir)

    def on_signal(self, signum: int) -> None:
        """Ask the running controller to stop its workers; fit() then returns and
        :meth:`run` raises :class:`Interrupt`. (An exception raised inside Ray's blocking
        get would surface as a SystemError.) Between attempts, and with the learner in this
        thread, raise at once; while it writes the run directory, once that is written."""
        self.signum = signum
        if self.reporting:
            return
        controller = self.trainer.controller if self.trainer else None
        if controller is None:
            raise Interrupt(signum)
        controller.abort.remote()

    def abort(self) -> None:
        """Stop the running attempt's controller and workers (bounded wait)."""
        controller = self.trainer.controller if self.trainer else None
        if controller is not None:
            with contextlib.suppress(Exception):  # abort ends the actor: its call fails
                ray.get(controller.abort.remote(), timeout=10)

    def _trainer(self) -> _Trainer:
        """The attempt's trainer: its workers run :func:`~rlft_ray.run.loop.train_loop_per_worker`."""
        cfg, res = self.cfg, self.cfg.resources
        datasets, inline = _ray_datasets(self.probe.datasets)
        attempt = f"{self.output_dir.name}-{uuid.uuid4().hex[:8]}"  # never a foreign state
        storage = res.storage_path or str(self.output_dir / "ray_train")
        if not res.storage_path:  # earlier attempts' copies: checkpoint_last is the state
            shutil.rmtree(self.output_dir / "ray_train", ignore_errors=True)
        last = self.output_dir / "checkpoint_last"
        resume_from = _stage_checkpoint(last, res.storage_path, attempt) if last.is_dir() else None
        run_dir = RunDirCallback(
            str(self.output_dir),
            self.learner_cls.best_metric(cfg),
            tensorboard=config_yaml(cfg) if cfg.tracking.tensorboard else None,
            window=cfg.best_window,
        )
        inputs = {
            "cfg": cfg,
            "spaces": self.probe.spaces,
            "runners": self.runners,
            "resume_from": resume_from,
            "start_checkpoint": None if resume_from else self.start,
            "datasets": sorted(datasets),
            "inline_datasets": inline,
            "tables": self.probe.tables,
        }
        if self.in_driver:  # no controller calls the callbacks: the loop does them
            inputs["report_to"] = [_DeferSignals(run_dir, self), *self.callbacks]
            inputs["shared_weights"] = self.shared  # one machine: no object store for weights
        return _Trainer(
            train_loop_per_worker,
            # In a worker, by reference: Ray Train also hands train_loop_config to its
            # controller, which would import torch, transformers and gymnasium to unpickle
            # spaces, actor handles and tables it never reads (seconds on 2 cores).
            train_loop_config={LOOP_CFG: inputs if self.in_driver else ray.put(inputs)},
            datasets=datasets,
            scaling_config=ScalingConfig(
                num_workers=0 if self.in_driver else res.num_learners,  # 0: local mode
                use_gpu=res.use_gpu,
                resources_per_worker={"CPU": res.cpus_per_learner, **res.learner_resources},
            ),
            run_config=ray.train.RunConfig(
                name=attempt,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=0),  # restarts are ours (run())
                callbacks=[run_dir, *self.callbacks],
            ),
        )


def _stage_checkpoint(last: Path, storage_path: str | None, attempt: str) -> ray.train.Checkpoint:
    """``checkpoint_last`` as the learners read it: the local directory, or (with a
    shared ``resources.storage_path`` on a multi-node cluster) a copy uploaded there."""
    if not storage_path:
        return ray.train.Checkpoint.from_directory(str(last))
    import pyarrow.fs

    uri = storage_path if "://" in storage_path else str(Path(storage_path).resolve())
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    dest = f"{root.rstrip('/')}/{attempt}/resume_from"
    pyarrow.fs.copy_files(
        str(last), dest, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
    )
    return ray.train.Checkpoint(path=dest, filesystem=fs)


def _deterministic(error: BaseException) -> bool:
    """Would the failure happen again on a restart (see :class:`DeterministicError`)?"""
    failures = getattr(error, "worker_failures", None) or {}
    kinds = (DeterministicError, ConfigError)  # the schema's errors stay free of imports
    return any(
        isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)
        for exc in failures.values()
    )


#: Tables up to this many rows go to the learners whole (each rank takes its share in
#: memory); larger ones stream through Ray Data, sharded over the ranks by Ray Train.
INLINE_ROWS = 200_000


def _streams(table: Any) -> bool:
    """Whether the probe's ``table`` streams through Ray Data (else it goes whole)."""
    return len(table) > INLINE_ROWS


def _ray_datasets(tables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The probe's tables (pandas): ``(Ray Datasets, tables passed whole)``.

    Starting Ray Data's actors for a table that fits in memory costs more than a small
    run's whole training; such tables travel in the loop config instead.
    """
    inline = {name: t for name, t in tables.items() if not _streams(t)}
    big = {name: t for name, t in tables.items() if name not in inline}
    if not big:
        return {}, inline
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return {name: ray.data.from_pandas(t) for name, t in big.items()}, inline


def failure_cause(error: BaseException | None) -> str | None:
    """The innermost worker error's message, without Ray's wrapping."""
    if error is None:
        return None
    worker_failures = getattr(error, "worker_failures", None) or {}
    for exc in worker_failures.values():
        inner = getattr(exc, "cause", None) or exc
        return f"{type(inner).__name__}: {str(inner).strip().splitlines()[-1]}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
