"""Starting a run: checks before Ray, actors, the Ray Train trainer, outputs after.

Everything that can be wrong with the user's input (config, env id, output dir,
``init_from``, cluster size) is checked before any actor or trainer starts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train

from rlft_ray.config import ConfigError, RunConfig, save_config
from rlft_ray.core.torch_utils import peak_rss_mb, process_state_kept, torch_threads
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import Learner, TaskProbe
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.learners.rllib_ckpt import is_rllib_checkpoint, rllib_state_for
from rlft_ray.rollout.group import make_remote_runners
from rlft_ray.run.attempts import (
    Attempts,
    Interrupt,
    RunError,
    RunInterrupted,
    RunSignals,
    failure_cause,
)
from rlft_ray.run.early_stop import overoptimization_stop, watched_metrics
from rlft_ray.run.lock import RunDirLock, remove_temp_files
from rlft_ray.run.metrics import read_metrics, truncate_metrics, write_summary
from rlft_ray.run.plots import plot_curve
from rlft_ray.run.progress import ProgressBar
from rlft_ray.run.ray_session import init_ray
from rlft_ray.run.resources import check_fits, scorer_gpus
from rlft_ray.run.startup import StartupMarks
from rlft_ray.run.tracking import TrackerFeed, check_tracking

logger = logging.getLogger(__name__)


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
    track: bool = True,
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
        track: Feed ``tracking.mlflow_uri`` / ``tracking.wandb_project`` from the driver
            (Tune trials pass False: Tune's logger callbacks do it there).

    Raises:
        RunError: With the cause (NaN loss, dead actor, ...) and the last good checkpoint.
        RunInterrupted: SIGINT / SIGTERM arrived; the summary says ``interrupted``.
    """
    with process_state_kept():  # the caller's threads and RNGs, as they were
        return _run_training(
            cfg, output_dir, resume, progress, callbacks, address, start_checkpoint, track
        )


def _run_training(
    cfg: RunConfig,
    output_dir: str | Path,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Any],
    address: str | None,
    start_checkpoint: ray.train.Checkpoint | None,
    track: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    marks = StartupMarks(say=progress)
    output_dir = Path(output_dir).resolve()
    learner_cls = get_learner_cls(cfg.algo)
    if learner_cls.runs_itself:  # algo: rllib: RLlib's Algorithm runs its own loop
        from rlft_ray.run.rllib_run import run_rllib

        return run_rllib(
            cfg, output_dir, resume, progress, callbacks, address, start_checkpoint, track
        )
    # 1. Everything about the input that can be wrong, checked before Ray.
    cfg, probe = check_task(learner_cls, cfg)
    marks.mark("checks")
    created = not output_dir.exists()
    with RunDirLock(output_dir), RunSignals() as signals:  # one writer per run directory
        try:
            prepare_run_dir(cfg, probe, output_dir, resume)
            # 2. Ray, data preparation on the cluster, actors.
            init_ray(address)
            marks.mark("ray_init")
            signals.install()
            probe, scorers, runners = _prepare_and_start_actors(learner_cls, cfg, probe, output_dir)
            marks.mark("actors")
        except BaseException:
            if created:  # leave no half-made run directory behind
                shutil.rmtree(output_dir, ignore_errors=True)
            signals.raise_if_interrupted("before training started")
            raise
        bar = ProgressBar(output_dir, cfg, learner_cls.score_metric) if progress else None
        feed = TrackerFeed(output_dir, cfg) if track and TrackerFeed.wanted(cfg) else None
        fit = Attempts(cfg, probe, runners, output_dir, learner_cls, callbacks, start_checkpoint)
        signals.attempts = fit
        status = "failed"  # what the trackers record if anything below raises
        try:
            try:
                error = fit.run()
            except Interrupt as stop:
                error = stop
                fit.abort()
            finally:
                signals.finishing = True  # the summary is written whatever arrives now
                if bar:
                    bar.close()
                for actor in [*runners, *scorers]:
                    ray.kill(actor)
            # 3. Summary, learning curve, and the error with what was kept.
            marks.mark("training")
            summary = _write_outputs(
                output_dir, cfg, learner_cls, probe, fit, error, started, marks
            )
            status = summary["status"]
        finally:
            if feed:
                feed.close(status)
    _raise_for(error, summary, output_dir)
    return summary


def _prepare_and_start_actors(
    learner_cls: type[Learner], cfg: RunConfig, probe: TaskProbe, output_dir: Path
) -> tuple[TaskProbe, list[Any], list[Any]]:
    """Check the actors and learners fit the cluster, run the learner's data preparation
    (e.g. DPO's reference log-probs), start the scorer and rollout actors."""
    scorers_needed = learner_cls.scores_samples and cfg.lm.reward_model is not None
    has_actors = learner_cls.sampler(cfg) is not None
    check_fits(cfg.resources, ray.cluster_resources(), actors=has_actors, scorers=scorers_needed)
    if learner_cls.prepare_uses_actors(cfg):
        # the preparation holds rollout actors before the learners start: they must fit too
        check_fits(cfg.resources, ray.cluster_resources(), learners=False)
    probe = learner_cls.prepare(cfg, probe, output_dir)
    scorers = _start_scorers(cfg) if scorers_needed else []
    runners = _start_rollout_actors(learner_cls, cfg, scorers) if has_actors else []
    return probe, scorers, runners


def _write_outputs(
    output_dir: Path,
    cfg: RunConfig,
    learner_cls: type[Learner],
    probe: TaskProbe,
    fit: Attempts,
    error: BaseException | None,
    started: float,
    marks: StartupMarks,
) -> dict[str, Any]:
    """``summary.json`` (with ``status`` and the ``startup`` breakdown) and the learning
    curve; temp leftovers removed."""
    remove_temp_files(output_dir)
    rows = read_metrics(output_dir)
    startup = marks.breakdown(rows)
    logger.debug("start-up breakdown: %s", startup)
    status = "interrupted" if isinstance(error, Interrupt) else "failed" if error else "completed"
    extra = {"algo": cfg.algo, "env": cfg.env.id, "status": status, "error": failure_cause(error)}
    extra.update({"learner_restarts": fit.restarts, **probe.info, "startup": startup})
    extra["peak_rss_mb"] = peak_memory(rows, learner_in_driver=fit.in_driver)
    if cfg.stop_on_overoptimization is not None:
        extra["early_stop"] = _early_stop(rows, cfg, learner_cls)
    summary = write_summary(output_dir, time.perf_counter() - started, extra)
    y_key, x_key, png = learner_cls.curve
    plot_curve(output_dir, y_key=y_key, x_key=x_key, name=png)
    return summary


def _early_stop(
    rows: list[dict[str, Any]], cfg: RunConfig, learner_cls: type[Learner]
) -> dict[str, Any] | None:
    """What ``stop_on_overoptimization`` stopped on (None: the run went its full budget)."""
    if not any(r.get("stop/overoptimization") for r in rows):
        return None
    watched = watched_metrics(learner_cls.best_metric(cfg))
    return overoptimization_stop(rows, cfg.stop_on_overoptimization, watched)


def peak_memory(rows: list[dict[str, Any]], learner_in_driver: bool) -> dict[str, float]:
    """Peak resident memory per process over the run, MB: the driver, each learner rank's
    ``perf/peak_rss_mb/*`` rows (rank 0's: the learner in the driver is the driver), each
    actor's, and their sum (processes, not shared pages)."""
    peaks: dict[str, float] = {"driver": round(peak_rss_mb(), 1)}
    for row in rows:
        for key, value in row.items():
            if key.startswith("perf/peak_rss_mb/"):
                name = key.rsplit("/", 1)[1]
                peaks[name] = round(max(peaks.get(name, 0.0), float(value)), 1)
    if learner_in_driver:  # one process: count it once
        peaks.pop("learner", None)
    peaks["total"] = round(sum(peaks.values()), 1)
    return peaks


def _raise_for(error: BaseException | None, summary: dict[str, Any], output_dir: Path) -> None:
    """Raise what ended the run, with the checkpoint a ``--resume`` continues."""
    kept = summary["checkpoint_last"] or "none (stopped before the first checkpoint)"
    if isinstance(error, Interrupt):
        raise RunInterrupted(
            error.signum,
            f"interrupted by {signal.Signals(error.signum).name}; resume with "
            f"--resume --output-dir {output_dir} (last checkpoint: {kept})",
        )
    if error is not None:
        raise RunError(
            f"run failed: {failure_cause(error)}\nlast good checkpoint: {kept}"
        ) from error


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
    cfg = dataclasses.replace(cfg, tracking=check_tracking(cfg.tracking))
    for line in _describe(probe.info):
        logger.warning(line)
    if cfg.init_from and is_rllib_checkpoint(cfg.init_from):  # an RLlib RLModule's weights
        rllib_state_for(learner_cls.make_policy(cfg, probe.spaces), cfg.init_from)
    elif cfg.init_from:
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
        if (output_dir / "checkpoint_best").is_dir():  # so checkpoint_last existed once
            raise RunError(
                f"--resume: {last} is gone although the run saved checkpoints "
                "(checkpoint_best is there); refusing to start over on top of them"
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
    """Reward-model scorer actors serving ``lm.reward_model`` (all of an ensemble's members
    in each; on a GPU share when there is one)."""
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
            "path": list(cfg.lm.reward_models),
            "num_threads": torch_threads(res.cpus_per_scorer_actor),
            "device": "cuda" if gpus > 0 else "cpu",
            "add_special_tokens": not cfg.lm.chat_template,
            "std_coef": cfg.lm.reward_ensemble_std_coef,
            "clip": cfg.lm.reward_clip,
        },
        num_gpus=gpus,
    )


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
