"""Starting a run: checks before Ray, actors, the Ray Train trainer, outputs after.

Everything that can be wrong with the user's input (config, env id, output dir,
``init_from``, cluster size) is checked before any actor or trainer starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rlft_ray import checkpoint as ckpt
from rlft_ray.config import ConfigError, RunConfig, save_config
from rlft_ray.errors import DeterministicError
from rlft_ray.learners.base import Learner, TaskProbe
from rlft_ray.loop import train_loop_per_worker
from rlft_ray.registry import get_learner_cls
from rlft_ray.resources import check_fits, init_ray, scorer_gpus
from rlft_ray.rollout.group import make_remote_runners
from rlft_ray.rundir import (
    ProgressBar,
    RunDirCallback,
    RunDirLock,
    plot_curve,
    read_metrics,
    remove_temp_files,
    truncate_metrics,
    write_summary,
)
from rlft_ray.utils import torch_threads

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run could not start or stopped with an error; the message says why and what was kept."""


class RunInterrupted(RunError):
    """SIGINT / SIGTERM (Ctrl-C, ``ray job stop``) stopped the run; ``summary.json`` says
    ``status: interrupted`` and ``--resume`` continues from ``checkpoint_last``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to mix two runs in one directory; require a previous run for ``--resume``."""
    has_run = (output_dir / "config.yaml").is_file()
    if resume and not has_run:
        raise RunError(f"--resume: {output_dir} holds no run to resume (no config.yaml)")
    if not resume and has_run:
        raise RunError(
            f"{output_dir} already holds a run; pass --resume to continue it or choose another --output-dir"
        )
    output_dir.mkdir(parents=True, exist_ok=True)


def run_training(
    cfg: RunConfig,
    output_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    address: str | None = None,
    start_checkpoint: ray.train.Checkpoint | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on Ray and write the run directory; returns ``summary.json``'s content.

    Args:
        cfg: Validated run config.
        output_dir: Run directory (created; must not hold another run unless ``resume``).
        resume: Continue from the directory's ``checkpoint_last`` with continuous counters.
        progress: Show a live progress bar on the driver.
        callbacks: Extra Ray Train ``UserCallback`` s (the Tune trial's report bridge).
        address: Ray address; default: ``RAY_ADDRESS`` or a new local instance.
        start_checkpoint: Continue this checkpoint (weights, optimizer state, counters)
            in a fresh run directory, with ``cfg``'s hyperparameters (Tune trials: PBT
            exploit, trial restarts). Ignored once the directory has a checkpoint.

    Raises:
        RunError: With the cause (NaN loss, dead actor, ...) and the last good checkpoint.
        RunInterrupted: SIGINT / SIGTERM arrived; the summary says ``interrupted``.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    learner_cls = get_learner_cls(cfg.algo)
    # 1. Everything about the input that can be wrong, checked before Ray.
    cfg, probe = check_task(learner_cls, cfg)
    created = not output_dir.exists()
    with RunDirLock(output_dir):  # one writer per run directory
        try:
            prepare_run_dir(cfg, probe, output_dir, resume)
            # 2. Ray, data preparation on the cluster, actors.
            init_ray(address)
            scorers_needed = learner_cls.scores_samples and cfg.lm.reward_model is not None
            has_actors = learner_cls.sampler(cfg) is not None
            check_fits(
                cfg.resources, ray.cluster_resources(), actors=has_actors, scorers=scorers_needed
            )
            probe = learner_cls.prepare(cfg, probe, output_dir)  # e.g. DPO's reference log-probs
        except BaseException:
            if created:  # leave no half-made run directory behind
                shutil.rmtree(output_dir, ignore_errors=True)
            raise
        scorers = _start_scorers(cfg) if scorers_needed else []
        runners = _start_rollout_actors(learner_cls, cfg, scorers) if has_actors else []
        bar = ProgressBar(output_dir, cfg, learner_cls.score_metric) if progress else None
        fit = _Attempts(cfg, probe, runners, output_dir, learner_cls, callbacks, start_checkpoint)
        try:
            with _signals_to(fit.on_signal):
                error = fit.run()
        except _Interrupt as stop:
            error = stop
            fit.abort()
        finally:
            if bar:
                bar.close()
            for actor in [*runners, *scorers]:
                ray.kill(actor)
        # 3. Summary, learning curve, and the error with what was kept.
        remove_temp_files(output_dir)
        status = (
            "interrupted" if isinstance(error, _Interrupt) else "failed" if error else "completed"
        )
        extra = {"algo": cfg.algo, "env": cfg.env.id, "status": status, "error": _cause(error)}
        extra.update({"learner_restarts": fit.restarts, **probe.info})
        summary = write_summary(output_dir, time.perf_counter() - started, extra)
        y_key, x_key, png = learner_cls.curve
        plot_curve(output_dir, y_key=y_key, x_key=x_key, name=png)
    _raise_for(error, summary, output_dir)
    return summary


def _raise_for(error: BaseException | None, summary: dict[str, Any], output_dir: Path) -> None:
    """Raise what ended the run, with the checkpoint a ``--resume`` continues."""
    kept = summary["checkpoint_last"] or "none (stopped before the first checkpoint)"
    if isinstance(error, _Interrupt):
        raise RunInterrupted(
            error.signum,
            f"interrupted by {signal.Signals(error.signum).name}; resume with "
            f"--resume --output-dir {output_dir} (last checkpoint: {kept})",
        )
    if error is not None:
        raise RunError(f"run failed: {_cause(error)}\nlast good checkpoint: {kept}") from error


def check_task(learner_cls: type[Learner], cfg: RunConfig) -> tuple[RunConfig, TaskProbe]:
    """Probe the task (env spaces, or model, tokenizer and data) and check ``init_from``:
    what can be wrong with the input, before any directory or Ray work.

    Raises:
        ConfigError / CheckpointError: Naming the key or path at fault.
        RunError: The task cannot be made.
    """
    try:
        probe = learner_cls.probe(cfg)  # env spaces / model, tokenizer and prompt data
    except ConfigError:
        raise
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    cfg, signature = probe.cfg or cfg, probe.spaces.signature()
    if cfg.init_from:  # the learners run in another working directory
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))
    for line in _describe(probe.info):
        logger.warning(line)
    if cfg.init_from:
        ckpt.check_compatible(cfg.init_from, cfg, signature, same_algo=False)
        if (Path(cfg.init_from) / "policy.safetensors").is_file():  # a small gym policy
            ckpt.check_policy_fits(cfg.init_from, learner_cls.make_policy(cfg, probe.spaces))
    return cfg, probe


def prepare_run_dir(cfg: RunConfig, probe: TaskProbe, output_dir: Path, resume: bool) -> None:
    """Check the directory fits ``resume`` and, resuming, that ``checkpoint_last`` fits
    this run; drop metric rows after it and temp files of interrupted writes; write
    ``config.yaml``. The directory alone decides what a resume restores.

    Raises:
        RunError / CheckpointError: The directory holds another run, no run to resume, or
            a checkpoint that cannot continue this one.
    """
    prepare_output_dir(output_dir, resume)
    remove_temp_files(output_dir)
    last = output_dir / "checkpoint_last"
    if resume and last.is_dir():
        ckpt.check_compatible(last, cfg, probe.spaces.signature())
        ckpt.check_rank_states(last, cfg.resources.num_learners)
        truncate_metrics(output_dir, ckpt.read_state(last)["counters"]["iteration"])
    elif resume:
        reached = max(
            (int(r.get("counters/iteration", 0)) for r in read_metrics(output_dir)), default=0
        )
        if reached >= cfg.checkpoint_every:
            raise RunError(
                f"--resume: {last} is gone although the run reached iteration {reached} "
                f"(checkpoint_every={cfg.checkpoint_every}); refusing to start over on top of it"
            )
        logger.warning("--resume: no checkpoint yet; starting again from iteration 0")
        truncate_metrics(output_dir, 0)
    save_config(cfg, output_dir / "config.yaml")


def _start_rollout_actors(
    learner_cls: type[Learner], cfg: RunConfig, scorers: list[Any]
) -> list[Any]:
    """The run's rollout actors (env runners or generation actors), named uniquely; with
    ``lm.reward_model`` each gets the scorer actors' handles."""
    res = cfg.resources
    extra = {"scorers": scorers} if scorers else {}
    return make_remote_runners(
        learner_cls.sampler(cfg),
        res.num_rollout_actors,
        res.cpus_per_rollout_actor,
        res.max_actor_restarts,
        name_prefix=f"rlft-runner-{uuid.uuid4().hex[:8]}-",
        kwargs_for=lambda i: {**learner_cls.sampler_kwargs(cfg, i), **extra},
        resources=res.rollout_actor_resources,
        num_gpus=res.gpus_per_rollout_actor,
    )


def _start_scorers(cfg: RunConfig) -> list[Any]:
    """Reward-model scorer actors serving ``lm.reward_model`` (on a GPU share when there is one)."""
    from rlft_ray.rollout.scoring import RewardModelScorer

    res = cfg.resources
    gpus = scorer_gpus(res, float(ray.cluster_resources().get("GPU", 0.0)))
    return make_remote_runners(
        RewardModelScorer,
        res.num_scorer_actors,
        res.cpus_per_scorer_actor,
        res.max_actor_restarts,
        name_prefix=f"rlft-scorer-{uuid.uuid4().hex[:8]}-",
        kwargs_for=lambda i: {
            "path": cfg.lm.reward_model,
            "num_threads": torch_threads(res.cpus_per_scorer_actor),
            "device": "cuda" if gpus > 0 else "cpu",
            "add_special_tokens": not cfg.lm.chat_template,
        },
        num_gpus=gpus,
    )


class _Interrupt(BaseException):
    """SIGINT / SIGTERM in the driver (a BaseException: nothing on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_to(handler: Any) -> Iterator[None]:
    """``handler`` takes SIGINT and SIGTERM while training (main thread only: a Tune
    trial runs this in a thread and Tune handles its signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


class _Trainer(TorchTrainer):
    """``TorchTrainer`` that keeps its controller's handle, so an interrupt can abort it,
    and leaves SIGINT to the run (Ray's own handler exits 0 without a summary)."""

    controller: Any = None

    def _register_sigint_handler(self, controller: Any) -> None:
        self.controller = controller


class _Attempts:
    """The Ray Train attempts of one run: the first, then a restart after each worker
    failure (up to ``resources.max_failures``), always from the run directory's
    ``checkpoint_last`` (never Ray Train's storage, so a fresh run can't pick up a foreign
    checkpoint). A deterministic failure (NaN loss, reward function error, bad data or
    checkpoint) would fail the same way again and is not retried."""

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
        self.restarts = 0
        self.signum: int | None = None
        self.trainer: _Trainer | None = None

    def run(self) -> BaseException | None:
        """Fit until done; returns the failure that ended the run, None on success.

        Raises:
            _Interrupt: SIGINT / SIGTERM arrived (:meth:`on_signal`).
        """
        limit = self.cfg.resources.max_failures
        while True:
            self.trainer = self._trainer()
            try:
                self.trainer.fit()
            except BaseException as exc:
                if self.signum is not None:  # whatever the abort made fit() raise
                    raise _Interrupt(self.signum) from None
                if not isinstance(exc, ray.train.TrainingFailedError):
                    raise
                if _deterministic(exc) or (limit != -1 and self.restarts >= limit):
                    return exc
                self._before_restart(exc, limit)
                continue
            if self.signum is not None:
                raise _Interrupt(self.signum)
            return None

    def _before_restart(self, exc: BaseException, limit: int) -> None:
        """Count the restart; drop rows after ``checkpoint_last`` (they run again)."""
        self.restarts += 1
        last = self.output_dir / "checkpoint_last"
        iteration = ckpt.read_state(last)["counters"]["iteration"] if last.is_dir() else 0
        logger.warning(
            "learners failed (%s); restart %d/%s from iteration %d",
            _cause(exc),
            self.restarts,
            "unlimited" if limit == -1 else limit,
            iteration,
        )
        truncate_metrics(self.output_dir, iteration)
        remove_temp_files(self.output_dir)

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT / SIGTERM: ask the controller to stop its workers; fit() then returns and
        :meth:`run` raises :class:`_Interrupt`. (An exception raised inside Ray's blocking
        get would surface as a SystemError.) A second signal stops waiting."""
        first = self.signum is None
        self.signum = signum
        controller = self.trainer.controller if self.trainer else None
        if not first or controller is None:
            raise _Interrupt(signum)
        controller.abort.remote()

    def abort(self) -> None:
        """Stop the running attempt's controller and workers (bounded wait)."""
        controller = self.trainer.controller if self.trainer else None
        if controller is not None:
            with contextlib.suppress(Exception):  # abort ends the actor: its call fails
                ray.get(controller.abort.remote(), timeout=10)

    def _trainer(self) -> _Trainer:
        """The attempt's trainer: its workers run :func:`~rlft_ray.loop.train_loop_per_worker`."""
        cfg, res = self.cfg, self.cfg.resources
        datasets, inline = _ray_datasets(self.probe.datasets)
        attempt = f"{self.output_dir.name}-{uuid.uuid4().hex[:8]}"  # never a foreign state
        storage = res.storage_path or str(self.output_dir / "ray_train")
        last = self.output_dir / "checkpoint_last"
        resume_from = _stage_checkpoint(last, res.storage_path, attempt) if last.is_dir() else None
        return _Trainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg,
                "spaces": self.probe.spaces,
                "runners": self.runners,
                "resume_from": resume_from,
                "start_checkpoint": None if resume_from else self.start,
                "datasets": sorted(datasets),
                "inline_datasets": inline,
                "tables": self.probe.tables,
            },
            datasets=datasets,
            scaling_config=ScalingConfig(
                num_workers=res.num_learners,
                use_gpu=res.use_gpu,
                resources_per_worker={"CPU": res.cpus_per_learner, **res.learner_resources},
            ),
            run_config=ray.train.RunConfig(
                name=attempt,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=0),  # restarts are ours (run())
                callbacks=[
                    RunDirCallback(str(self.output_dir), self.learner_cls.score_metric),
                    *self.callbacks,
                ],
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
    return any(
        isinstance(exc, DeterministicError)
        or isinstance(getattr(exc, "cause", None), DeterministicError)
        for exc in failures.values()
    )


#: Tables up to this many rows go to the learners whole (each rank takes its share in
#: memory); larger ones stream through Ray Data, sharded over the ranks by Ray Train.
INLINE_ROWS = 200_000


def _ray_datasets(tables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The probe's tables (pandas): ``(Ray Datasets, tables passed whole)``.

    Starting Ray Data's actors for a table that fits in memory costs more than a small
    run's whole training; such tables travel in the loop config instead.
    """
    inline = {name: t for name, t in tables.items() if len(t) <= INLINE_ROWS}
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


def _describe(info: dict[str, Any]) -> list[str]:
    """Console lines for the probe's counted decisions (prompts dropped, pad token chosen)."""
    lines = []
    dropped = {
        k: v
        for k, v in info.items()
        if k.startswith("data/") and k.endswith(("_dropped", "truncated")) and v
    }
    if dropped:
        lines.append(
            f"prompts from {info.get('data/source')}: kept {info.get('data/kept')}/{info.get('data/total')}, "
            + ", ".join(f"{k.removeprefix('data/')}={v}" for k, v in dropped.items())
        )
    if info.get("tokenizer_pad"):
        lines.append(str(info["tokenizer_pad"]))
    return lines


def _cause(error: BaseException | None) -> str | None:
    """The innermost worker error's message, without Ray's wrapping."""
    if error is None:
        return None
    worker_failures = getattr(error, "worker_failures", None) or {}
    for exc in worker_failures.values():
        inner = getattr(exc, "cause", None) or exc
        return f"{type(inner).__name__}: {str(inner).strip().splitlines()[-1]}"
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
