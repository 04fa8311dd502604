"""``algo: rllib``: an RLlib ``Algorithm`` trained inside rlft-ray's run directory.

The driver builds the algorithm from ``rllib.algorithm`` / ``rllib.config`` (checked
before Ray starts, see :mod:`rlft_ray.learners.rllib`) and calls ``Algorithm.train()``
until the budget (``total_env_steps``, ``total_iterations``, ``time_limit_s``) or an
early stop (``stop_return``, ``stop_success_rate``) ends the run. Each iteration is a
``metrics.jsonl`` row (:mod:`.rllib_metrics`); every ``checkpoint_every`` iterations
RLlib's own checkpoint (``Algorithm.save_to_path``) is written with rlft-ray's
``state.json`` and ``config.yaml`` beside it and handed to the same
:class:`~rlft_ray.run.callback.RunDirCallback` the Ray Train loop reports to, which
keeps ``checkpoint_last`` / ``checkpoint_best`` (atomically) and TensorBoard; Tune's
bridge callback gets the same reports. ``--resume`` restores ``checkpoint_last/rllib``
with ``Algorithm.restore_from_path``; ``init_from`` loads an RLlib RLModule checkpoint
(or an rlft-ray PPO / DQN policy, converted) into the algorithm's module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
import torch

from rlft_ray.config import RunConfig, config_yaml, save_config
from rlft_ray.core.errors import CheckpointError
from rlft_ray.core.torch_utils import process_state_kept
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import TaskProbe
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.learners.rllib import EnvInfo, build_algorithm_config, register_rllib_env
from rlft_ray.run.attempts import Interrupt, RunSignals
from rlft_ray.run.callback import RunDirCallback
from rlft_ray.run.lock import RunDirLock, remove_temp_files
from rlft_ray.run.metrics import ROWS_KEY, read_metrics, write_summary
from rlft_ray.run.plots import plot_curve
from rlft_ray.run.progress import ProgressBar
from rlft_ray.run.ray_session import init_ray
from rlft_ray.run.rllib_init import check_init_from, restore_init_from
from rlft_ray.run.rllib_metrics import env_steps_lifetime, episode_lists, result_row
from rlft_ray.run.startup import StartupMarks
from rlft_ray.run.tracking import TrackerFeed, check_tracking

#: RLlib's checkpoints of this run (``checkpoint_*`` are copies of two of them).
STORE_DIR = "rllib_checkpoints"
#: Inside a checkpoint: what ``Algorithm.save_to_path`` wrote.
RLLIB_DIR = "rllib"


def run_rllib(
    cfg: RunConfig,
    output_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    address: str | None = None,
    start_checkpoint: ray.train.Checkpoint | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` (``algo: rllib``) and write the run directory; returns ``summary.json``'s
    content. Arguments as :func:`rlft_ray.run.driver.run_training`'s."""
    with process_state_kept():
        return _run(cfg, output_dir, resume, progress, callbacks, address, start_checkpoint, track)


def _check(cfg: RunConfig) -> tuple[RunConfig, TaskProbe, EnvInfo, Any]:
    """Env, RLlib config and ``init_from``: everything about the input, before Ray."""
    from rlft_ray.learners.rllib import probe_env
    from rlft_ray.run.attempts import RunError

    learner_cls = get_learner_cls(cfg.algo)
    try:
        probe = learner_cls.probe(cfg)
        env = probe_env(cfg)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    if cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))
    cfg = dataclasses.replace(cfg, tracking=check_tracking(cfg.tracking))
    algo_config = _algo_config(cfg, env)
    if cfg.init_from:
        check_init_from(cfg, env, algo_config)
    return cfg, probe, env, algo_config


def _algo_config(cfg: RunConfig, env: EnvInfo) -> Any:
    """The algorithm's config with the run's evaluation (``eval_every``), and RLlib's own
    smoothing window of 20 episodes, unless ``rllib.config`` sets them."""
    algo_config = build_algorithm_config(cfg, env)
    own = cfg.rllib.config
    if "metrics_num_episodes_for_smoothing" not in own:
        algo_config.reporting(metrics_num_episodes_for_smoothing=ckpt.RECENT_EPISODES)
    if cfg.eval_every is not None and "evaluation_interval" not in own:
        algo_config.evaluation(
            evaluation_interval=cfg.eval_every,
            evaluation_duration=cfg.eval_episodes,
            evaluation_duration_unit="episodes",
            evaluation_config={"explore": False},
        )
    return algo_config


def driver_threads(cfg: RunConfig, algo_config: Any) -> int:
    """Torch threads of the driver, where RLlib's local learner (``num_learners: 0``) and
    local env runner (``num_env_runners: 0``) compute: ``resources.threads_per_learner``,
    else the CPUs RLlib gives a learner (``num_cpus_per_learner``, ``auto``: 1), as our own
    learners hold theirs. Torch's default (every core) made SAC's 256-sample update of two
    256-wide MLPs 7x slower on a loaded 2-core machine (51 ms a pass with 2 threads, 7 ms
    with 1)."""
    from rlft_ray.core.torch_utils import torch_threads

    cpus = algo_config.num_cpus_per_learner
    own = cfg.resources.threads_per_learner
    return own or torch_threads(cpus if isinstance(cpus, (int, float)) else 1)


def _run(
    cfg: RunConfig,
    output_dir: str | Path,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Any],
    address: str | None,
    start_checkpoint: ray.train.Checkpoint | None,
    track: bool,
) -> dict[str, Any]:
    from rlft_ray.run.driver import prepare_run_dir

    started = time.perf_counter()
    marks = StartupMarks(say=progress)
    output_dir = Path(output_dir).resolve()
    cfg, probe, env, algo_config = _check(cfg)
    torch.set_num_threads(driver_threads(cfg, algo_config))  # restored by process_state_kept
    marks.mark("checks")
    learner_cls = get_learner_cls(cfg.algo)
    created = not output_dir.exists()
    algo = None
    with RunDirLock(output_dir), RunSignals() as signals:
        try:
            prepare_run_dir(cfg, probe, output_dir, resume)
            init_ray(address)
            register_rllib_env()
            marks.mark("ray_init")
            signals.install()
            algo = algo_config.build_algo()
            counters = _restore(algo, cfg, env, output_dir, resume, start_checkpoint)
            marks.mark("actors")
        except BaseException:
            if algo is not None:
                algo.stop()
            if created:
                shutil.rmtree(output_dir, ignore_errors=True)
            signals.raise_if_interrupted("before training started")
            raise
        bar = ProgressBar(output_dir, cfg, learner_cls.score_metric) if progress else None
        feed = TrackerFeed(output_dir, cfg) if track and TrackerFeed.wanted(cfg) else None
        status = "failed"
        try:
            error: BaseException | None = None
            loop = _Loop(algo, cfg, probe, output_dir, counters, callbacks)
            try:
                loop.run()
            except (Interrupt, Exception) as exc:
                error = exc
                loop.flush()
            finally:
                signals.finishing = True
                if bar:
                    bar.close()
                algo.stop()
            marks.mark("training")
            summary = _write_outputs(output_dir, cfg, learner_cls, probe, error, started, marks)
            status = summary["status"]
        finally:
            if feed:
                feed.close(status)
    from rlft_ray.run.driver import _raise_for

    _raise_for(error, summary, output_dir)
    return summary


def _restore(
    algo: Any,
    cfg: RunConfig,
    env: EnvInfo,
    output_dir: Path,
    resume: bool,
    start_checkpoint: ray.train.Checkpoint | None,
) -> _Base:
    """Continue ``checkpoint_last`` (``--resume``), else a Tune start checkpoint, else
    start from ``init_from``, else fresh; the counters the run continues from."""
    last = output_dir / "checkpoint_last"
    if resume and last.is_dir():
        return _restore_checkpoint(algo, cfg, last)
    if start_checkpoint is not None:
        with start_checkpoint.as_directory() as path:
            return _restore_checkpoint(algo, cfg, Path(path))
    if cfg.init_from:
        restore_init_from(algo, cfg, env)
    return _Base(ckpt.Counters(), 0)


@dataclasses.dataclass
class _Base:
    """Counters at the start of this attempt, and RLlib's lifetime env steps then."""

    counters: ckpt.Counters
    steps_lifetime: int


def _restore_checkpoint(algo: Any, cfg: RunConfig, path: Path) -> _Base:
    state = ckpt.read_state(path)
    saved = (state.get("rllib") or {}).get("algorithm")
    if saved != cfg.rllib.algorithm:
        raise CheckpointError(
            f"checkpoint {path} is RLlib {saved}'s, this run's rllib.algorithm is {cfg.rllib.algorithm}"
        )
    algo.restore_from_path(str(path / RLLIB_DIR))
    counters = ckpt.Counters(**state["counters"])
    extra = state["rllib"]
    return _Base(counters, int(extra["steps_lifetime"]))


class _Loop:
    """``Algorithm.train()`` until the run ends; rows and checkpoints to the callbacks."""

    def __init__(
        self,
        algo: Any,
        cfg: RunConfig,
        probe: TaskProbe,
        output_dir: Path,
        base: _Base,
        callbacks: Sequence[Any],
    ) -> None:
        self.algo, self.cfg, self.output_dir, self.base = algo, cfg, output_dir, base
        self.signature = probe.spaces.signature()
        self.counters = dataclasses.replace(base.counters)
        learner_cls = get_learner_cls(cfg.algo)
        self.best_metric = learner_cls.best_metric(cfg)
        writer = RunDirCallback(
            str(output_dir),
            self.best_metric,
            tensorboard=config_yaml(cfg) if cfg.tracking.tensorboard else None,
            window=cfg.best_window,
        )
        self.callbacks = [writer, *callbacks]
        self.rows: list[dict[str, float]] = []
        self.last_report = time.monotonic()
        self.store = output_dir / STORE_DIR

    def run(self) -> None:
        clock_start = time.perf_counter() - self.counters.wall_s
        while not _finished(self.cfg, self.counters):
            result = self.algo.train()
            c = self.counters
            c.iteration += 1
            c.policy_version = c.iteration
            c.env_steps = (
                self.base.counters.env_steps + env_steps_lifetime(result) - self.base.steps_lifetime
            )
            c.record_episodes(*episode_lists(result.get("env_runners") or {}))
            c.wall_s = time.perf_counter() - clock_start
            row = result_row(result)
            if c.recent_returns:  # rlft-ray's window: the last 20 episodes, across iterations
                row["rollout/episode_return_mean"] = float(c.return_mean())
            if c.recent_successes:
                row["rollout/success_rate"] = sum(c.recent_successes) / len(c.recent_successes)
            row.update(
                {
                    "counters/iteration": float(c.iteration),
                    "counters/env_steps": float(c.env_steps),
                    "counters/policy_version": float(c.policy_version),
                    "counters/episodes": float(c.episodes),
                    "time/wall_s": c.wall_s,
                }
            )
            self._add(row, result, last=_finished(self.cfg, c))

    def _add(self, row: dict[str, float], result: dict[str, Any], last: bool) -> None:
        self.rows.append(row)
        evaluated = any(k.startswith("eval/") for k in row)
        due = last or self.counters.iteration % self.cfg.checkpoint_every == 0
        due |= evaluated and self.best_metric.startswith("eval/")
        if not due and time.monotonic() - self.last_report < self.cfg.report_interval_s:
            return
        checkpoint = self._save(result) if due else None
        self._report(row, checkpoint)

    def flush(self) -> None:
        """Report rows not yet written (the run stopped between reports)."""
        if self.rows:
            self._report(self.rows[-1], None)

    def _report(self, row: dict[str, float], checkpoint: ray.train.Checkpoint | None) -> None:
        payload = {**row, ROWS_KEY: self.rows}
        self.rows, self.last_report = [], time.monotonic()
        for callback in self.callbacks:
            callback.after_report(None, [payload], checkpoint)

    def _save(self, result: dict[str, Any]) -> ray.train.Checkpoint:
        """RLlib's checkpoint plus ``state.json`` / ``config.yaml`` in the run's store; the
        newest few are kept (Tune may still be copying the one before the last)."""
        path = self.store / f"iter_{self.counters.iteration:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".iter.", dir=self._store()))
        self.algo.save_to_path(str(tmp / RLLIB_DIR))
        steps = env_steps_lifetime(result)
        state = {
            "counters": dataclasses.asdict(self.counters),
            "algo": self.cfg.algo,
            "spaces": self.signature,
            "modules": [RLLIB_DIR],
            "rllib": {
                "algorithm": self.cfg.rllib.algorithm,
                "steps_lifetime": steps,
            },
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        save_config(self.cfg, tmp / "config.yaml")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in sorted(self.store.glob("iter_*"))[: -max(2, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        return ray.train.Checkpoint.from_directory(str(path))

    def _store(self) -> Path:
        self.store.mkdir(parents=True, exist_ok=True)
        return self.store


def _finished(cfg: RunConfig, counters: ckpt.Counters) -> bool:
    """The budget is spent, an early stop is reached (over the last 20 episodes, once 20
    have finished, as in the Ray Train loop), or ``time_limit_s`` has passed."""
    window = ckpt.RECENT_EPISODES
    done = counters.env_steps >= cfg.total_env_steps
    done |= cfg.total_iterations is not None and counters.iteration >= cfg.total_iterations
    done |= cfg.time_limit_s is not None and counters.wall_s >= cfg.time_limit_s
    done |= (
        cfg.stop_return is not None
        and len(counters.recent_returns) >= window
        and counters.return_mean() >= cfg.stop_return
    )
    done |= (
        cfg.stop_success_rate is not None
        and len(counters.recent_successes) >= window
        and sum(counters.recent_successes) / window >= cfg.stop_success_rate
    )
    return bool(done)


def _write_outputs(
    output_dir: Path,
    cfg: RunConfig,
    learner_cls: type,
    probe: TaskProbe,
    error: BaseException | None,
    started: float,
    marks: StartupMarks,
) -> dict[str, Any]:
    from rlft_ray.run.attempts import failure_cause
    from rlft_ray.run.driver import peak_memory

    remove_temp_files(output_dir)
    with contextlib.suppress(OSError):
        for tmp in (output_dir / STORE_DIR).glob(".iter.*"):
            shutil.rmtree(tmp, ignore_errors=True)
    rows = read_metrics(output_dir)
    status = "interrupted" if isinstance(error, Interrupt) else "failed" if error else "completed"
    extra = {"algo": cfg.algo, "env": cfg.env.id, "status": status, "error": failure_cause(error)}
    extra.update({"learner_restarts": 0, **probe.info, "startup": marks.breakdown(rows)})
    extra["peak_rss_mb"] = peak_memory(rows, learner_in_driver=True)
    summary = write_summary(output_dir, time.perf_counter() - started, extra)
    y_key, x_key, png = learner_cls.curve
    plot_curve(output_dir, y_key=y_key, x_key=x_key, name=png)
    return summary
