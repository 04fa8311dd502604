"""Starting a run: checks before Ray, actors, the Ray Train trainer, outputs after.

Everything that can be wrong with the user's input (config, env id, output dir,
``init_from``, cluster size) is checked before any actor or trainer starts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rlft_ray import checkpoint as ckpt
from rlft_ray.config import ConfigError, RunConfig, save_config
from rlft_ray.learners.base import Learner, TaskProbe
from rlft_ray.loop import train_loop_per_worker
from rlft_ray.registry import get_learner_cls
from rlft_ray.resources import check_fits, init_ray, scorer_gpus
from rlft_ray.rollout.group import make_remote_runners
from rlft_ray.rundir import (
    RunDirCallback,
    plot_curve,
    read_metrics,
    truncate_metrics,
    write_summary,
)
from rlft_ray.utils import torch_threads

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run could not start or stopped with an error; the message says why and what was kept."""


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
        resume: Continue from the directory's last checkpoint with continuous counters.
        progress: Show a live progress bar on the driver.
        callbacks: Extra Ray Train ``UserCallback`` s (the Tune trial's report bridge).
        address: Ray address; default: ``RAY_ADDRESS`` or a new local instance.
        start_checkpoint: Continue this checkpoint (weights, optimizer state, counters)
            in a fresh run directory, with ``cfg``'s hyperparameters (Tune trials: PBT
            exploit, trial restarts). Ignored when ``resume`` finds a checkpoint.

    Raises:
        RunError: With the cause (NaN loss, dead actor, ...) and the last good checkpoint.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    learner_cls = get_learner_cls(cfg.algo)
    # 1. Everything about the input that can be wrong, checked before Ray.
    cfg, probe = preflight(learner_cls, cfg, output_dir, resume)
    # 2. Ray, data preparation on the cluster, actors, learners.
    init_ray(address)
    scorers_needed = learner_cls.scores_samples and cfg.lm.reward_model is not None
    has_actors = learner_cls.sampler(cfg) is not None
    check_fits(cfg.resources, ray.cluster_resources(), actors=has_actors, scorers=scorers_needed)
    probe = learner_cls.prepare(cfg, probe, output_dir)  # e.g. DPO's reference log-probs
    scorers = _start_scorers(cfg) if scorers_needed else []
    runners = _start_rollout_actors(learner_cls, cfg, scorers) if has_actors else []
    trainer = _trainer(cfg, probe, runners, output_dir, learner_cls, callbacks, start_checkpoint)
    bar = _Progress(output_dir, cfg, learner_cls.score_metric) if progress else None
    error: BaseException | None = None
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        error = exc
    finally:
        if bar:
            bar.close()
        for actor in [*runners, *scorers]:
            ray.kill(actor)
    # 3. Summary, learning curve, and the error with what was kept.
    extra = {"algo": cfg.algo, "env": cfg.env.id, "error": _cause(error), **probe.info}
    summary = write_summary(output_dir, time.perf_counter() - started, extra)
    y_key, x_key, png = learner_cls.curve
    plot_curve(output_dir, y_key=y_key, x_key=x_key, name=png)
    if error is not None:
        kept = summary["checkpoint_last"] or "none (failed before the first checkpoint)"
        raise RunError(f"run failed: {_cause(error)}\nlast good checkpoint: {kept}") from error
    return summary


def preflight(
    learner_cls: type[Learner], cfg: RunConfig, output_dir: Path, resume: bool
) -> tuple[RunConfig, TaskProbe]:
    """Probe the task and check ``init_from``, the output directory and ``--resume``'s
    checkpoint; write ``config.yaml``. Returns the config as workers see it and the probe.

    Raises:
        ConfigError / CheckpointError: Naming the key or path at fault.
        RunError: The task cannot be made, or the output directory does not fit ``resume``.
    """
    try:
        probe = learner_cls.probe(cfg)  # env spaces / model, tokenizer and prompt data
    except ConfigError:
        raise
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    cfg, signature = probe.cfg or cfg, probe.spaces.signature()
    for line in _describe(probe.info):
        logger.warning(line)
    if cfg.init_from:
        ckpt.check_compatible(cfg.init_from, cfg, signature, same_algo=False)
        if (Path(cfg.init_from) / "policy.safetensors").is_file():  # a small gym policy
            ckpt.check_policy_fits(cfg.init_from, learner_cls.make_policy(cfg, probe.spaces))
    prepare_output_dir(output_dir, resume)
    last = output_dir / "checkpoint_last"
    if resume and last.is_dir():
        ckpt.check_compatible(last, cfg, signature)
        ckpt.check_rank_states(last, cfg.resources.num_learners)
        truncate_metrics(output_dir, ckpt.read_state(last)["counters"]["iteration"])
    save_config(cfg, output_dir / "config.yaml")
    return cfg, probe


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


def _trainer(
    cfg: RunConfig,
    probe: TaskProbe,
    runners: list[Any],
    output_dir: Path,
    learner_cls: type[Learner],
    callbacks: Sequence[Any],
    start_checkpoint: ray.train.Checkpoint | None,
) -> TorchTrainer:
    """The ``TorchTrainer`` whose workers run :func:`~rlft_ray.loop.train_loop_per_worker`."""
    datasets, inline = _ray_datasets(probe.datasets)
    res = cfg.resources
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "spaces": probe.spaces,
            "runners": runners,
            "start_checkpoint": start_checkpoint,
            "datasets": sorted(datasets),
            "inline_datasets": inline,
            "tables": probe.tables,
        },
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=res.num_learners,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_learner, **res.learner_resources},
        ),
        run_config=ray.train.RunConfig(
            name=output_dir.name,
            storage_path=res.storage_path or str(output_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=res.max_failures),
            callbacks=[RunDirCallback(str(output_dir), learner_cls.score_metric), *callbacks],
        ),
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


class _Progress:
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
        self.start_rows = len(read_metrics(output_dir))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._refresh()

    def _refresh(self) -> None:
        rows = read_metrics(self.output_dir)
        if len(rows) <= self.start_rows:
            return
        last = rows[-1]
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
