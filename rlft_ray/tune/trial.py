"""One Tune trial: a Tune function that runs a whole training run and reports it to Tune.

Ray Train V2 (the default since Ray 2.51) no longer runs ``Tuner(TorchTrainer)``:
each trial is a Tune *function* that builds its own trainer through
:func:`rlft_ray.run.driver.run_training`. Ray's ``TuneReportCallback`` forwards only
metrics (a checkpoint reaches Tune as a ``checkpoint_path`` string), but PBT and
``--resume`` need real Tune checkpoints, so :class:`TuneBridgeCallback` hands each
Ray Train report, checkpoint included, from the Train controller to the trial
function, which reports it with ``ray.tune.report``. A trial restarted from a Tune
checkpoint (PBT exploit, trial retry, ``--resume``) continues it in a new run
directory with its own (possibly mutated) hyperparameters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from rlft_ray.config import RunConfig, build_config
from rlft_ray.tune.spec import SpecError

logger = logging.getLogger(__name__)

#: Set (to 1.0) in the final result of a trial whose run reached its end.
COMPLETED_KEY = "trial/completed"


class TuneBridgeCallback(UserCallback):
    """Runs in the Ray Train controller: hands every report, checkpoint included, to the
    Tune trial function through a Ray queue.

    Ray's ``TuneReportCallback`` sends only the metrics (the checkpoint as a path
    string), but PBT exploits and trial restores need Tune to hold real checkpoints.

    Args:
        queue: A ``ray.util.queue.Queue`` the trial function reads.
    """

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        # RunDirCallback ran first and popped the per-iteration rows.
        self.queue.put((dict(metrics[0]), checkpoint))


_DONE = "__rlft_run_done__"


@dataclass(frozen=True)
class _TrialContext:
    """What every trial needs from the driver (shipped with ``tune.with_parameters``)."""

    base: dict[str, Any]
    output_dir: str
    metric: str
    checkpoint_reports_only: bool
    cwd: str


def _run_trial(config: dict[str, Any], ctx: _TrialContext) -> None:
    """The Tune trainable: one training run per (re)start of the trial."""
    from ray import tune
    from ray.util.queue import Queue

    if Path(ctx.cwd).is_dir():
        # Tune starts trials in their own directory; relative paths in the run config
        # (lm.model, lm.prompts, ...) mean what they mean to `rlft-ray train` here.
        os.chdir(ctx.cwd)
    trial_id = tune.get_context().get_trial_id()
    cfg, run_dir = _trial_run(build_config(base=ctx.base, overrides=config), ctx, trial_id)
    queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, BaseException] = {}
    thread = threading.Thread(
        target=_train_into_queue,
        args=(cfg, run_dir, queue, tune.get_checkpoint(), outcome),
        name="rlft-trial-run",
        daemon=True,
    )
    # Train in a helper thread; this (Tune's) thread reports, so that Tune stopping
    # the trial (ASHA, PBT pause) ends it inside ``tune.report`` as Tune expects.
    thread.start()
    seen_metric, reported = _forward_reports(queue, ctx, final_ok=lambda: "error" not in outcome)
    thread.join()
    queue.shutdown(force=True)
    if "error" in outcome:
        raise outcome["error"]
    if not reported:
        # Restarted from a checkpoint that had already reached the end of the budget
        # (PBT can clone a trial on its final report): nothing left to train.
        logger.warning("trial %s: start checkpoint was already at the end of the run", trial_id)
        return
    if not seen_metric:
        raise SpecError(
            "metric",
            f"'{ctx.metric}' was never reported by this run (see {run_dir / 'metrics.jsonl'} for the metric names)",
        )


def _trial_run(cfg: RunConfig, ctx: _TrialContext, trial_id: str) -> tuple[RunConfig, Path]:
    """The trial's config (own storage prefix) and a fresh run directory for this (re)start.

    PBT exploits and retries continue another checkpoint with other hyperparameters,
    which must not mix with earlier rows, so every start gets ``run<k>``.
    """
    trial_dir = Path(ctx.output_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    run_dir = trial_dir / f"run{sum(1 for p in trial_dir.glob('run*') if p.is_dir())}"
    if cfg.resources.storage_path:
        # One shared storage_path for all trials: give each trial its own prefix.
        storage = f"{cfg.resources.storage_path.rstrip('/')}/{Path(ctx.output_dir).name}/trials/{trial_id}"
        cfg = dataclasses.replace(
            cfg, resources=dataclasses.replace(cfg.resources, storage_path=storage)
        )
    return cfg, run_dir


def _train_into_queue(
    cfg: RunConfig, run_dir: Path, queue: Any, start: Any, outcome: dict[str, BaseException]
) -> None:
    """Run the training (reports flow into ``queue`` through the bridge), then mark the end."""
    from rlft_ray.run.driver import run_training

    try:
        run_training(
            cfg,
            run_dir,
            progress=False,
            callbacks=[TuneBridgeCallback(queue)],
            start_checkpoint=start,
            track=False,  # Tune's logger callbacks (tracker_callbacks) log the trials
        )
    except BaseException as exc:
        outcome["error"] = exc
    finally:
        queue.put(_DONE)


def _forward_reports(queue: Any, ctx: _TrialContext, final_ok: Any) -> tuple[bool, bool]:
    """Report every queued Ray Train report to Tune; returns (metric seen, anything reported).

    Each report goes to Tune when the next one arrives, so that the run's last report
    can carry the completion marker: Tune marks a trial's last result ``done`` alike
    when the run finished and when a scheduler stopped it, and the marker is a stop
    criterion, so no scheduler acts on a finished run's result (PBT would otherwise
    clone into or from a trial that has nothing left to run).
    """
    from ray import tune

    seen_metric = False

    def report(metrics: dict[str, Any], checkpoint: Any, final: bool = False) -> None:
        nonlocal seen_metric
        if ctx.metric in metrics:
            seen_metric = True
        else:
            metrics[ctx.metric] = float("nan")  # e.g. no episode finished yet
        metrics[COMPLETED_KEY] = 1.0 if final else 0.0
        tune_ckpt = (
            tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem)
            if checkpoint
            else None
        )
        tune.report(metrics, checkpoint=tune_ckpt)

    held: tuple[dict[str, Any], Any] | None = None
    while (item := queue.get()) != _DONE:
        metrics, checkpoint = item
        if ctx.checkpoint_reports_only and checkpoint is None:
            continue  # PBT: every result Tune sees must be restorable
        if held is not None:
            report(*held)
        held = (metrics, checkpoint)
    if held is not None:
        report(*held, final=final_ok())
    return seen_metric, held is not None


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"
