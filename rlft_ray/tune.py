"""Hyperparameter search with Ray Tune over run configs (``rlft-ray tune SPEC``).

A *spec* (YAML, see ``tuning/``) names a run config and a search space over that
config's fields, addressed by the same dotted names as CLI overrides::

    run_config: ../examples/cartpole_ppo.yaml   # relative to the spec file
    overrides: {total_env_steps: 30000}          # fixed for every trial
    resources: {num_rollout_actors: 1, cpus_per_rollout_actor: 0.25, cpus_per_learner: 0.5}
    search_space:
      ppo.lr: {loguniform: [1.0e-4, 3.0e-3]}
      ppo.num_epochs: {choice: [2, 4, 8]}
    scheduler: {type: asha, time_attr: counters/env_steps, max_t: 30000, grace_period: 8000}
    search: {algorithm: random, seed: 0}          # random | grid | optuna
    num_samples: 4
    max_concurrent_trials: 2
    metric: rollout/episode_return_mean
    mode: max

Every key and every distribution is checked before Ray starts: a sample of each
dimension is put through :func:`rlft_ray.config.build_config`, so a misspelled
field or an ill-typed value fails with the key named.

Ray Train V2 (the default since Ray 2.51) no longer runs ``Tuner(TorchTrainer)``:
each trial is a Tune *function* that builds its own trainer through
:func:`rlft_ray.driver.run_training`. Ray's ``TuneReportCallback`` forwards only
metrics (a checkpoint reaches Tune as a ``checkpoint_path`` string), but PBT and
``--resume`` need real Tune checkpoints, so :class:`TuneBridgeCallback` hands each
Ray Train report, checkpoint included, from the Train controller to the trial
function, which reports it with ``ray.tune.report``. A trial restarted from a
Tune checkpoint (PBT exploit, trial retry, ``--resume``) continues it in a new
run directory with its own (possibly mutated) hyperparameters.

Layout of ``--output-dir``::

    spec.yaml             the spec, with run_config made absolute
    tune/                 Ray Tune's experiment (trial results, Tune checkpoints)
    trials/<id>/run<k>/   each trial's run directories (metrics.jsonl, checkpoint_best, ...)
    results.csv           one row per trial: config, metric, iterations, status, error
    best.json             best trial: dotted overrides, metric, checkpoint path
    metric_curves.png     the metric against iterations, one line per trial
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ray.train import UserCallback

from rlft_ray.config import ConfigError, build_config, from_dict, load_yaml, to_dict
from rlft_ray.resources import ResourceError, check_fits
from rlft_ray.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

EXPERIMENT_NAME = "tune"
#: Set (to 1.0) in the final result of a trial whose run reached its end.
COMPLETED_KEY = "trial/completed"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
#: Tune's own time attributes, allowed next to the run's ``counters/*`` and ``time/*``.
_TUNE_TIME_ATTRS = ("training_iteration", "time_total_s")


class SpecError(ConfigError):
    """A tuning spec is invalid; the message names the spec key (e.g. ``search_space.ppo.lr``)."""


# --------------------------------------------------------------------------- spec schema


@dataclass(frozen=True)
class SchedulerSpec:
    """``scheduler:`` section. Time values are in units of ``time_attr``.

    Attributes:
        type: ``fifo`` (run every trial to the end), ``asha`` (stop bad trials at
            rungs) or ``pbt`` (population based training).
        time_attr: Reported counter that measures progress (``counters/env_steps``
            is comparable across trials with different ``rollout_steps``).
        max_t: ASHA: the time at which every trial is done.
        grace_period: ASHA: no trial is stopped before this.
        reduction_factor: ASHA: keep the top ``1/reduction_factor`` at each rung.
        perturbation_interval: PBT: time between exploit/explore steps.
        quantile_fraction: PBT: bottom fraction that copies the top fraction.
        resample_probability: PBT: chance to resample a value instead of perturbing it.
        mutations: PBT: search-space keys to mutate (default: all of them).
        synch: PBT: synchronous rounds (all trials pause at each interval).
    """

    type: Literal["fifo", "asha", "pbt"] = "fifo"
    time_attr: str = "counters/env_steps"
    max_t: float | None = None
    grace_period: float | None = None
    reduction_factor: float | None = None
    perturbation_interval: float | None = None
    quantile_fraction: float | None = None
    resample_probability: float | None = None
    mutations: tuple[str, ...] | None = None
    synch: bool | None = None

    def __post_init__(self) -> None:
        ok_attr = self.time_attr in _TUNE_TIME_ATTRS or self.time_attr.startswith(
            ("counters/", "time/")
        )
        if not ok_attr:
            raise ConfigError(
                "time_attr",
                f"must be a reported counter (counters/env_steps, counters/iteration, time/wall_s) or one of {list(_TUNE_TIME_ATTRS)}, got {self.time_attr!r}",
            )
        own = {
            "fifo": (),
            "asha": ("max_t", "grace_period", "reduction_factor"),
            "pbt": (
                "perturbation_interval",
                "quantile_fraction",
                "resample_probability",
                "mutations",
                "synch",
            ),
        }[self.type]
        for name in (
            "max_t",
            "grace_period",
            "reduction_factor",
            "perturbation_interval",
            "quantile_fraction",
            "resample_probability",
            "mutations",
            "synch",
        ):
            if getattr(self, name) is not None and name not in own:
                raise ConfigError(
                    name,
                    f"is not a setting of scheduler type '{self.type}' (its settings: {', '.join(own) or 'none'})",
                )
        if self.type == "asha":
            if self.max_t is None or self.max_t <= 0:
                raise ConfigError("max_t", "asha needs max_t > 0 (in units of time_attr)")
            if self.grace_period is not None and not 0 < self.grace_period <= self.max_t:
                raise ConfigError("grace_period", f"must be in (0, max_t={self.max_t:g}]")
            if self.reduction_factor is not None and self.reduction_factor <= 1:
                raise ConfigError("reduction_factor", "must be > 1")
        if self.type == "pbt":
            if self.perturbation_interval is None or self.perturbation_interval <= 0:
                raise ConfigError(
                    "perturbation_interval",
                    "pbt needs perturbation_interval > 0 (in units of time_attr)",
                )
            if self.quantile_fraction is not None and not 0 < self.quantile_fraction <= 0.5:
                raise ConfigError("quantile_fraction", "must be in (0, 0.5]")
            if self.resample_probability is not None and not 0 <= self.resample_probability <= 1:
                raise ConfigError("resample_probability", "must be in [0, 1]")


@dataclass(frozen=True)
class SearchSpec:
    """``search:`` section.

    Attributes:
        algorithm: ``random`` (Tune's variant generator: random samples, grid
            dimensions crossed), ``grid`` (the same, but every dimension must be a
            ``grid``) or ``optuna`` (TPE via ``OptunaSearch``; no grid dimensions).
        seed: Seed of the sampler (reproducible trial configs).
    """

    algorithm: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = None


@dataclass(frozen=True)
class _SpecFile:
    """The top level of a spec file (parsed with :func:`rlft_ray.config.from_dict`).

    Attributes:
        run_config: The run YAML every trial starts from (relative to the spec file).
        search_space: ``{dotted.key: {distribution: args}}`` with one of ``choice``,
            ``grid`` (lists of values), ``uniform``, ``loguniform`` (``[low, high]``)
            or ``randint`` (``[low, high)``, upper bound exclusive as in Tune).
        overrides: Dotted overrides fixed for every trial.
        resources: ``resources.*`` fields of one trial (rollout actors, learners, CPUs).
        scheduler: See :class:`SchedulerSpec`.
        search: See :class:`SearchSpec`.
        num_samples: Trials to sample (grid dimensions multiply it).
        max_concurrent_trials: Trials at once; default as many as the cluster fits.
        metric: Reported metric that ranks trials (and Tune checkpoints).
        mode: ``max`` or ``min``.
        max_failures: Tune restarts a crashed trial this often (from its checkpoint).
        keep_checkpoints: Tune checkpoints kept per trial (best by metric + latest);
            default 3, for PBT all (an exploiting trial may restore an old one).
        storage_path: Where Tune keeps the experiment (shared path or ``s3://`` URI on
            multi-node clusters); default ``--output-dir``.
    """

    run_config: str = ""
    search_space: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    metric: str = "rollout/episode_return_mean"
    mode: Literal["max", "min"] = "max"
    max_failures: int = 0
    keep_checkpoints: int | None = None
    storage_path: str | None = None

    def __post_init__(self) -> None:
        if not self.run_config:
            raise ConfigError(
                "run_config",
                "required: the run YAML the trials start from (relative to the spec file)",
            )
        if not self.search_space:
            raise ConfigError(
                "search_space", "must name at least one dotted config field to search over"
            )
        if self.num_samples < 1:
            raise ConfigError("num_samples", "must be >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError("max_concurrent_trials", "must be >= 1 or null (as many as fit)")
        if self.max_failures < -1:
            raise ConfigError("max_failures", "must be >= -1 (-1: unlimited retries)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints", "must be >= 1 or null (keep all)")
        if not self.metric:
            raise ConfigError(
                "metric", "must name a reported metric, e.g. rollout/episode_return_mean"
            )


@dataclass(frozen=True)
class Dimension:
    """One search-space entry: a dotted config key and its distribution."""

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def spec_key(self) -> str:
        """The key as written in the spec (for error messages)."""
        return f"search_space.{self.key}"

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
            self.kind
        ](lo, hi)

    def samples(self) -> list[Any]:
        """Values that stand for the whole dimension when validating the config."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        if self.kind == "randint":
            return [lo, hi - 1]
        mid = math.sqrt(lo * hi) if self.kind == "loguniform" else (lo + hi) / 2
        return [lo, mid, hi]

    def mutation(self) -> Any:
        """What PBT mutates with: categorical values shift along the list, numbers get
        perturbed (x0.8 / x1.2) or resampled from the same distribution."""
        return list(self.values) if self.kind in ("choice", "grid") else self.domain()

    def clip(self, value: Any) -> Any:
        """Keep a PBT-perturbed value inside the dimension's bounds."""
        if self.kind in ("choice", "grid"):
            return value
        lo, hi = self.values
        if self.kind == "randint":
            return int(min(max(round(value), lo), hi - 1))
        return float(min(max(value, lo), hi))


@dataclass(frozen=True)
class TuneSpec:
    """A validated tuning spec.

    Attributes:
        path: The spec file.
        run_config: Absolute path of the run YAML.
        fixed: Dotted overrides every trial gets (``overrides`` plus ``resources.*``).
        dimensions: The search space.
        raw: The spec as a mapping (``run_config`` made absolute), saved as ``spec.yaml``.
        base: The run config with ``fixed`` applied (as a nested mapping).
    """

    path: Path
    run_config: Path
    fixed: dict[str, Any]
    dimensions: tuple[Dimension, ...]
    scheduler: SchedulerSpec
    search: SearchSpec
    num_samples: int
    max_concurrent_trials: int | None
    metric: str
    mode: str
    max_failures: int
    keep_checkpoints: int | None
    storage_path: str | None
    raw: dict[str, Any]
    base: dict[str, Any]

    @property
    def keys(self) -> list[str]:
        """The searched dotted keys."""
        return [d.key for d in self.dimensions]

    def trial_config(self, sampled: Mapping[str, Any]) -> Any:
        """The :class:`~rlft_ray.config.RunConfig` of one trial."""
        return build_config(base=self.base, overrides=dict(sampled))

    def overrides_for(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Every dotted override (fixed and searched) that reproduces a trial from ``run_config``."""
        return {**self.fixed, **{k: sampled[k] for k in self.keys if k in sampled}}


def _spec_error(prefix: str, exc: ConfigError) -> SpecError:
    return SpecError(f"{prefix}.{exc.key}" if exc.key else prefix, exc.reason)


def _parse_dimension(key: Any, value: Any) -> Dimension:
    where = f"search_space.{key}"
    if not isinstance(key, str) or not key:
        raise SpecError(where, "keys are dotted config fields, e.g. ppo.lr")
    example = "e.g. {loguniform: [1.0e-4, 1.0e-2]} or {choice: [2, 4, 8]}"
    if not isinstance(value, Mapping) or len(value) != 1:
        raise SpecError(
            where,
            f"expected one distribution ({', '.join(DISTRIBUTIONS)}), {example}; got {value!r}",
        )
    kind, args = next(iter(value.items()))
    if kind not in DISTRIBUTIONS:
        near = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise SpecError(
            where, f"unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)}){hint}"
        )
    where = f"{where}.{kind}"
    if not isinstance(args, Sequence) or isinstance(args, str):
        raise SpecError(where, f"expected a list, got {args!r}")
    args = tuple(args)
    if kind in ("choice", "grid"):
        if not args:
            raise SpecError(where, "needs at least one value")
        return Dimension(key, kind, args)
    if len(args) != 2:
        raise SpecError(where, f"expected [low, high], got {list(args)!r}")
    try:
        lo, hi = (
            float(a) if not isinstance(a, bool) else None for a in args
        )  # YAML reads 1e-4 as a string
    except (TypeError, ValueError):
        lo = hi = None
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpecError(where, f"bounds must be finite numbers, got {list(args)!r}")
    if not lo < hi:
        raise SpecError(where, f"needs low < high, got [{lo:g}, {hi:g}]")
    if kind == "loguniform" and lo <= 0:
        raise SpecError(where, f"needs low > 0, got {lo:g}")
    if kind == "randint":
        if not (lo.is_integer() and hi.is_integer()):
            raise SpecError(
                where, f"bounds must be integers (upper bound exclusive), got {list(args)!r}"
            )
        return Dimension(key, kind, (int(lo), int(hi)))
    return Dimension(key, kind, (lo, hi))


def load_spec(path: str | Path) -> TuneSpec:
    """Read and validate a tuning spec; nothing touches Ray.

    Raises:
        SpecError: naming the spec key (``search_space.ppo.lrr``, ``scheduler.type``, ...).
    """
    path = Path(path)
    try:
        data = load_yaml(path)
    except ConfigError as exc:
        raise SpecError("", str(exc).replace("run file", "spec file")) from None
    try:
        parsed: _SpecFile = from_dict(_SpecFile, data)
    except ConfigError as exc:
        raise SpecError(exc.key, exc.reason) from None

    run_config = Path(parsed.run_config).expanduser()
    if not run_config.is_absolute():
        run_config = (path.parent / run_config).resolve()
    if not run_config.is_file():
        raise SpecError(
            "run_config", f"run file not found: {run_config} (paths are relative to the spec file)"
        )

    try:
        build_config(run_config)
    except ConfigError as exc:
        raise SpecError("run_config", f"{run_config}: {exc}") from None
    fixed: dict[str, Any] = {str(k): v for k, v in parsed.overrides.items()}
    for key, value in parsed.resources.items():
        fixed[f"resources.{key}"] = value
    try:
        base_cfg = build_config(run_config, fixed)
    except ConfigError as exc:
        # resources.* keys name themselves; anything else came from overrides:.
        where = exc.key if exc.key.startswith("resources.") else f"overrides.{exc.key}"
        raise SpecError(where, exc.reason) from None
    base = to_dict(base_cfg)
    if base["init_from"] and not Path(base["init_from"]).is_absolute():
        # Trials run in Tune's trial directory; a relative path would point elsewhere.
        base["init_from"] = str(Path(base["init_from"]).resolve())

    dims = tuple(_parse_dimension(k, v) for k, v in parsed.search_space.items())
    for dim in dims:
        if dim.key.startswith("resources.") or dim.key == "resources":
            raise SpecError(
                dim.spec_key,
                "per-trial resources are fixed for a search: set them under resources:",
            )
        if dim.key in fixed:
            raise SpecError(dim.spec_key, "is also set under overrides: (drop one)")
        for value in dim.samples():
            try:
                build_config(base=base, overrides={dim.key: value})
            except ConfigError as exc:
                reason = exc.reason if exc.key == dim.key else str(exc)
                if not reason.startswith("unknown key") and repr(value) not in reason:
                    reason += f" (for the sampled value {value!r})"
                raise SpecError(dim.spec_key, reason) from None
    _check_combination(parsed, dims)
    raw = dict(data)
    raw["run_config"] = str(run_config)
    return TuneSpec(
        path=path,
        run_config=run_config,
        fixed=fixed,
        dimensions=dims,
        scheduler=parsed.scheduler,
        search=parsed.search,
        num_samples=parsed.num_samples,
        max_concurrent_trials=parsed.max_concurrent_trials,
        metric=parsed.metric,
        mode=parsed.mode,
        max_failures=parsed.max_failures,
        keep_checkpoints=_keep_checkpoints(parsed),
        storage_path=parsed.storage_path,
        raw=raw,
        base=base,
    )


def _keep_checkpoints(parsed: _SpecFile) -> int | None:
    """Tune checkpoints kept per trial (the best by ``metric`` plus the latest).

    PBT keeps all by default: a trial told to exploit may wait (paused) for a free
    slot while its source keeps checkpointing, and Tune refuses to restore a deleted one.
    """
    if parsed.keep_checkpoints is not None:
        return parsed.keep_checkpoints
    return None if parsed.scheduler.type == "pbt" else 3


def _check_combination(parsed: _SpecFile, dims: tuple[Dimension, ...]) -> None:
    """Scheduler/search/space combinations that Tune would reject mid-run (or mis-handle)."""
    keys = [d.key for d in dims]
    grid = [d.key for d in dims if d.kind == "grid"]
    algo = parsed.search.algorithm
    if algo == "optuna":
        if grid:
            raise SpecError(
                f"search_space.{grid[0]}",
                "grid dimensions need search.algorithm: random or grid (optuna samples; use choice)",
            )
        if parsed.scheduler.type == "pbt":
            raise SpecError(
                "search.algorithm",
                "pbt mutates configs itself: use search.algorithm: random with scheduler.type: pbt",
            )
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpecError(
                "search.algorithm", "optuna is not installed: pip install 'rlft-ray[tune]'"
            ) from None
    if algo == "grid":
        other = [d.key for d in dims if d.kind != "grid"]
        if other:
            raise SpecError(
                f"search_space.{other[0]}",
                "search.algorithm: grid needs every dimension to be a grid (or use algorithm: random)",
            )
    if parsed.scheduler.type == "pbt":
        for key in parsed.scheduler.mutations or ():
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise SpecError("scheduler.mutations", f"'{key}' is not in search_space{hint}")


# --------------------------------------------------------------------------- trials


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
    import dataclasses

    from ray import tune
    from ray.util.queue import Queue

    from rlft_ray.driver import run_training

    if Path(ctx.cwd).is_dir():
        # Tune starts trials in their own directory; relative paths in the run config
        # (lm.model, lm.prompts, ...) mean what they mean to `rlft-ray train` here.
        os.chdir(ctx.cwd)
    cfg = build_config(base=ctx.base, overrides=config)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(ctx.output_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    # A fresh run directory per (re)start: PBT exploits and retries continue another
    # checkpoint with other hyperparameters, which must not mix with earlier rows.
    run_dir = trial_dir / f"run{sum(1 for p in trial_dir.glob('run*') if p.is_dir())}"
    if cfg.resources.storage_path:
        # One shared storage_path for all trials: give each trial its own prefix.
        storage = f"{cfg.resources.storage_path.rstrip('/')}/{Path(ctx.output_dir).name}/trials/{trial_id}"
        cfg = dataclasses.replace(
            cfg, resources=dataclasses.replace(cfg.resources, storage_path=storage)
        )
    start = tune.get_checkpoint()

    queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, BaseException] = {}

    def train() -> None:
        try:
            run_training(
                cfg,
                run_dir,
                progress=False,
                callbacks=[TuneBridgeCallback(queue)],
                start_checkpoint=start,
            )
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            queue.put(_DONE)

    # Train in a helper thread; this (Tune's) thread reports, so that Tune stopping
    # the trial (ASHA, PBT pause) ends it inside ``tune.report`` as Tune expects.
    thread = threading.Thread(target=train, name="rlft-trial-run", daemon=True)
    thread.start()
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

    # Each report goes to Tune when the next one arrives, so that the run's last
    # report can carry the completion marker: Tune marks a trial's last result
    # `done` alike when the run finished and when a scheduler stopped it, and the
    # marker is a stop criterion, so no scheduler acts on a finished run's result
    # (PBT would otherwise clone into or from a trial that has nothing left to run).
    held: tuple[dict[str, Any], Any] | None = None
    while True:
        item = queue.get()
        if item == _DONE:
            break
        metrics, checkpoint = item
        if ctx.checkpoint_reports_only and checkpoint is None:
            continue  # PBT: every result Tune sees must be restorable
        if held is not None:
            report(*held)
        held = (metrics, checkpoint)
    thread.join()
    queue.shutdown(force=True)
    if held is not None:
        report(*held, final="error" not in outcome)
    if "error" in outcome:
        raise outcome["error"]
    if held is None:
        # Restarted from a checkpoint that had already reached the end of the budget
        # (PBT can clone a trial on its final report): nothing left to train.
        logger.warning("trial %s: start checkpoint was already at the end of the run", trial_id)
        return
    if not seen_metric:
        raise SpecError(
            "metric",
            f"'{ctx.metric}' was never reported by this run (see {run_dir / 'metrics.jsonl'} for the metric names)",
        )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _clip_explored(config: dict[str, Any], dims: tuple[Dimension, ...]) -> dict[str, Any]:
    """PBT ``custom_explore_fn``: perturbed numbers stay inside the search space."""
    for dim in dims:
        if dim.key in config:
            config[dim.key] = dim.clip(config[dim.key])
    return config


def build_scheduler(spec: TuneSpec) -> Any:
    """The Tune scheduler for ``spec.scheduler`` (metric/mode come from the TuneConfig)."""
    from functools import partial

    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr=s.time_attr,
            max_t=s.max_t,
            grace_period=s.grace_period or 1,
            reduction_factor=s.reduction_factor or 2,
        )
    if s.type == "pbt":
        mutated = [d for d in spec.dimensions if s.mutations is None or d.key in s.mutations]
        return PopulationBasedTraining(
            time_attr=s.time_attr,
            perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={d.key: d.mutation() for d in mutated},
            quantile_fraction=s.quantile_fraction or 0.25,
            resample_probability=0.25 if s.resample_probability is None else s.resample_probability,
            custom_explore_fn=partial(_clip_explored, dims=tuple(mutated)),
            synch=bool(s.synch),
            log_config=True,  # writes pbt_global.txt: one line per exploit
        )
    return FIFOScheduler()


def build_search_alg(spec: TuneSpec, concurrency: int) -> Any:
    """The Tune search algorithm for ``spec.search``, limited to ``concurrency`` running trials."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.search.seed), max_concurrent=concurrency)
    # TuneConfig.max_concurrent_trials is ignored for a variant generator instance;
    # the generator has its own limit.
    return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=concurrency)


def trial_resources(spec: TuneSpec) -> Any:
    """Tune's placement group for one trial: the trial function itself needs nothing; one
    bundle per rollout actor, which the trial's ``run_training`` creates inside it.

    The learners are not in it: Ray Train V2 reserves their own placement group, so
    :func:`check_concurrency` makes sure concurrent trials' learners fit as well.
    """
    from ray.tune import PlacementGroupFactory

    res = build_config(base=spec.base).resources
    rollout = {"CPU": res.cpus_per_rollout_actor, **res.rollout_actor_resources}
    if res.gpus_per_rollout_actor > 0:
        rollout["GPU"] = res.gpus_per_rollout_actor
    return PlacementGroupFactory([{}] + [dict(rollout) for _ in range(res.num_rollout_actors)])


def per_trial_needs(spec: TuneSpec) -> dict[str, float]:
    """Everything one trial holds: rollout actors plus learners (CPU, GPU, custom)."""
    res = build_config(base=spec.base).resources
    needs = {
        "CPU": res.total_cpus,
        "GPU": res.num_rollout_actors * res.gpus_per_rollout_actor
        + (res.num_learners if res.use_gpu else 0),
    }
    for name in set(res.rollout_actor_resources) | set(res.learner_resources):
        needs[name] = res.num_rollout_actors * res.rollout_actor_resources.get(
            name, 0.0
        ) + res.num_learners * res.learner_resources.get(name, 0.0)
    return {k: v for k, v in needs.items() if v > 0}


def check_concurrency(spec: TuneSpec, cluster: Mapping[str, float]) -> int:
    """How many trials run at once; fail with numbers when they cannot fit.

    Raises:
        ResourceError: One trial does not fit, or ``max_concurrent_trials`` trials do not.
    """
    res = build_config(base=spec.base).resources
    check_fits(res, cluster)
    needs = per_trial_needs(spec)
    fits = {k: math.floor(float(cluster.get(k, 0.0)) / v + 1e-9) for k, v in needs.items()}
    limit = min(fits, key=fits.get)
    fit = max(1, fits[limit])
    want = spec.max_concurrent_trials
    if want is None:
        return fit
    if want > fit:
        detail = (
            f"{res.num_rollout_actors} rollout actors x {res.cpus_per_rollout_actor:g} + "
            f"{res.num_learners} learners x {res.cpus_per_learner:g}"
            if limit == "CPU"
            else "rollout actors + learners"
        )
        raise ResourceError(
            f"max_concurrent_trials={want} needs {want} x {needs[limit]:g} {limit} per trial "
            f"({detail}) = {want * needs[limit]:g} {limit}, cluster has "
            f"{float(cluster.get(limit, 0.0)):g}: at most {fit} fit; lower max_concurrent_trials "
            "or the per-trial resources"
        )
    return want


# --------------------------------------------------------------------------- running


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(address: str | None = None, needs_cleanup: bool = True) -> None:
    """Connect to ``address``/``RAY_ADDRESS`` or start local Ray, ready for trials that
    a scheduler stops.

    A stopped trial's process dies with its Ray Train controller; a detached Ray Train
    actor then removes the learners' placement group, finding the controller's state
    through the dashboard's state API. It looks the cluster up by address, which is
    ambiguous when several local Ray instances run on one machine, and a placement
    group left behind would starve every later trial of CPUs. A local instance started
    here therefore runs the dashboard on a known port and tells every worker where it is.

    Raises:
        RunError: Ray is already running without a dashboard and the scheduler stops
            trials (asha/pbt): stopped trials would leak their learners' CPUs.
    """
    import ray

    from rlft_ray.driver import RunError, init_ray

    if ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        init_ray(address)
    else:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        port = _free_port()
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    if needs_cleanup:
        try:
            from ray._private.worker import get_dashboard_url

            has_dashboard = bool(get_dashboard_url())
        except Exception:  # private helper moved: skip the check rather than fail
            has_dashboard = True
        if not has_dashboard:
            raise RunError(
                "Ray runs without its dashboard: Ray Train could not free the learners of "
                "trials that asha/pbt stop, and later trials would wait for CPUs forever; "
                "start Ray with the dashboard (ray.init(include_dashboard=True))"
            )


@dataclass
class SearchResult:
    """What :func:`run_search` produced."""

    output_dir: Path
    metric: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    wall_s: float
    exploits: int
    files: dict[str, Path]


def run_search(
    spec_path: str | Path,
    output_dir: str | Path,
    resume: bool = False,
    verbose: int = 1,
    address: str | None = None,
) -> SearchResult:
    """Run (or ``resume``) the search of a spec and write the results files.

    Args:
        spec_path: Tuning spec YAML.
        output_dir: Search directory (see the module docstring for its layout).
        resume: Continue the interrupted search in ``output_dir`` (``Tuner.restore``).
        verbose: Tune's console output (0 silent, 1 status tables).
        address: Ray address; default ``RAY_ADDRESS`` or a local instance.

    Raises:
        SpecError: Invalid spec (before Ray starts).
        ResourceError: Trials do not fit the cluster (before any trial starts).
        RunError: asha/pbt on a Ray instance without a dashboard (see :func:`connect_ray`).
    """
    started = time.perf_counter()
    spec = load_spec(spec_path)
    output_dir = Path(output_dir).resolve()
    exp_dir = output_dir / EXPERIMENT_NAME
    saved_spec = output_dir / "spec.yaml"
    if resume:
        if not saved_spec.is_file():
            raise SpecError("--resume", f"{output_dir} holds no search to resume (no spec.yaml)")
        if yaml.safe_load(saved_spec.read_text()) != spec.raw:
            raise SpecError(
                "--resume",
                f"{spec_path} differs from the spec the search started with ({saved_spec}); resume with that file",
            )
    elif saved_spec.exists() or exp_dir.exists():
        raise SpecError(
            "--output-dir",
            f"{output_dir} already holds a search; pass --resume to continue it or choose another --output-dir",
        )

    import ray
    from ray import tune

    # Tune warns each time a checkpoint forces an experiment-state snapshot; with
    # frequent small checkpoints that is noise, not a bottleneck.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    connect_ray(address, needs_cleanup=spec.scheduler.type != "fifo")
    concurrency = check_concurrency(spec, ray.cluster_resources())
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_spec, yaml.safe_dump(spec.raw, sort_keys=False))

    ctx = _TrialContext(
        base=spec.base,
        output_dir=str(output_dir),
        metric=spec.metric,
        checkpoint_reports_only=spec.scheduler.type == "pbt",
        cwd=os.getcwd(),
    )
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, ctx=ctx), trial_resources(spec)
    )
    storage = spec.storage_path or str(output_dir)
    name = EXPERIMENT_NAME if not spec.storage_path else f"{output_dir.name}-{EXPERIMENT_NAME}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    if resume:
        if not tune.Tuner.can_restore(exp_path):
            raise SpecError("--resume", f"no Tune experiment to restore at {exp_path}")
        tuner = tune.Tuner.restore(
            exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.domain() for d in spec.dimensions},
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=build_search_alg(spec, concurrency),
                scheduler=build_scheduler(spec),
                num_samples=spec.num_samples,
                trial_dirname_creator=_trial_dirname,
                reuse_actors=False,  # a stopped trial's actor must die, and its Train run with it
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=spec.keep_checkpoints,
                    checkpoint_score_attribute=spec.metric,
                    checkpoint_score_order=spec.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                stop={COMPLETED_KEY: 1.0},
                verbose=verbose,
            ),
        )
    grid = tuner.fit()
    rows = collect_rows(grid, spec)
    best = best_of(grid, spec)
    exploits = count_exploits(exp_path) if spec.scheduler.type == "pbt" else 0
    files = write_results(output_dir, spec, rows, best, grid)
    return SearchResult(
        output_dir, spec.metric, rows, best, time.perf_counter() - started, exploits, files
    )


# --------------------------------------------------------------------------- results


def _short_error(error: BaseException | None) -> str:
    """The innermost cause of a trial's error as ``Type: last line``."""
    if error is None:
        return ""
    exc: BaseException = error
    for _ in range(10):
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    # RunError puts the cause on its first line and the kept checkpoint after it.
    text = lines[0] if type(exc).__name__ == "RunError" and lines else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {text}".strip()


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _reached_end(metrics: Mapping[str, Any], config: Mapping[str, Any], spec: TuneSpec) -> bool:
    """Whether a trial without the completion marker still ran its full budget (ASHA
    stops every trial at ``max_t``, before the run's own last report arrives)."""
    total = config.get("total_env_steps", spec.base["total_env_steps"])
    if float(metrics.get("counters/env_steps", 0) or 0) >= total:
        return True
    iterations = config.get("total_iterations", spec.base.get("total_iterations"))
    if iterations is not None and float(metrics.get("counters/iteration", 0) or 0) >= iterations:
        return True
    s = spec.scheduler
    return s.type == "asha" and float(metrics.get(s.time_attr, 0) or 0) >= float(
        s.max_t or math.inf
    )


def collect_rows(grid: Any, spec: TuneSpec) -> list[dict[str, Any]]:
    """One row per trial: id, status, iterations, env steps, metric (last and best), config, error."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial = (
            Path(result.path).name.removeprefix("trial_")
            if result.path
            else metrics.get("trial_id", "?")
        )
        history = []
        try:
            df = result.metrics_dataframe
            if df is not None and spec.metric in df:
                history = [v for v in (_num(x) for x in df[spec.metric]) if v is not None]
        except Exception:  # a trial that never reported has no progress file
            history = []
        pick = max if spec.mode == "max" else min
        if result.error is not None:
            status = "ERROR"
        elif metrics.get(COMPLETED_KEY) or _reached_end(metrics, result.config or {}, spec):
            status = "TERMINATED"  # the run reached its end (total_env_steps, stop_return, max_t)
        else:
            status = "STOPPED"  # the scheduler ended it early (or the search was interrupted)
        rows.append(
            {
                "trial": trial,
                "status": status,
                "iterations": int(metrics.get("counters/iteration", 0) or 0),
                "env_steps": int(metrics.get("counters/env_steps", 0) or 0),
                "metric": _num(metrics.get(spec.metric)),
                "metric_best": pick(history) if history else None,
                "config": {k: (result.config or {}).get(k) for k in spec.keys},
                "error": _short_error(result.error),
            }
        )
    rows.sort(key=lambda r: r["trial"])
    return rows


def best_of(grid: Any, spec: TuneSpec) -> dict[str, Any] | None:
    """The best trial by its last ``metric``: dotted overrides, value, best checkpoint."""
    try:
        result = grid.get_best_result(
            metric=spec.metric, mode=spec.mode, scope="last", filter_nan_and_inf=True
        )
    except RuntimeError:  # no trial reported a finite value
        return None
    value = _num((result.metrics or {}).get(spec.metric))
    if value is None:
        return None
    checkpoint = result.get_best_checkpoint(spec.metric, spec.mode) or result.checkpoint
    overrides = spec.overrides_for(result.config or {})
    command = ["rlft-ray", "train", str(spec.run_config)] + [
        f"{k}={_override_value(v)}" for k, v in overrides.items()
    ]
    return {
        "trial": Path(result.path).name.removeprefix("trial_"),
        "metric": spec.metric,
        "mode": spec.mode,
        "value": value,
        "config": {k: (result.config or {}).get(k) for k in spec.keys},
        "overrides": overrides,
        "run_config": str(spec.run_config),
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "train_command": shlex.join(command),
    }


def _override_value(value: Any) -> str:
    """``value`` as the CLI reads it back (YAML): bare strings where unambiguous."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, separators=(",", ":"))


def count_exploits(exp_path: str) -> int:
    """PBT exploit steps so far (lines of Tune's ``pbt_global.txt``)."""
    path = Path(exp_path) / "pbt_global.txt"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The results as an aligned text table."""
    header = ["trial", "status", "iterations", metric, "best", "config", "error"]
    body = [
        [
            r["trial"],
            r["status"],
            str(r["iterations"]),
            _fmt(r["metric"]),
            _fmt(r["metric_best"]),
            " ".join(f"{k}={_fmt(v)}" for k, v in r["config"].items()),
            r["error"],
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def write_results(
    output_dir: Path,
    spec: TuneSpec,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    grid: Any,
) -> dict[str, Path]:
    """Write ``results.csv``, ``best.json`` and ``metric_curves.png``; returns their paths."""
    import io

    files: dict[str, Path] = {}
    buf = io.StringIO()
    cols = [
        "trial",
        "status",
        "iterations",
        "env_steps",
        spec.metric,
        f"{spec.metric} (best)",
        *spec.keys,
        "error",
    ]
    writer = csv.writer(buf)
    writer.writerow(cols)
    for r in rows:
        writer.writerow(
            [
                r["trial"],
                r["status"],
                r["iterations"],
                r["env_steps"],
                r["metric"],
                r["metric_best"],
                *(r["config"][k] for k in spec.keys),
                r["error"],
            ]
        )
    files["results"] = output_dir / "results.csv"
    atomic_write_text(files["results"], buf.getvalue())
    files["best"] = output_dir / "best.json"
    atomic_write_json(files["best"], best or {"error": f"no trial reported a finite {spec.metric}"})
    png = plot_trials(output_dir, grid, spec.metric)
    if png is not None:
        files["plot"] = png
    return files


def plot_trials(
    output_dir: Path, grid: Any, metric: str, x_key: str = "counters/iteration"
) -> Path | None:
    """PNG of ``metric`` against ``x_key``, one line per trial; None if nothing was reported."""
    curves = []
    for result in grid:
        try:
            df = result.metrics_dataframe
        except Exception:  # no progress file
            df = None
        if df is None or metric not in df or x_key not in df:
            continue
        df = df[[x_key, metric]].dropna()
        if len(df):
            curves.append(
                (
                    Path(result.path).name.removeprefix("trial_"),
                    df[x_key].to_numpy(),
                    df[metric].to_numpy(),
                )
            )
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, y in sorted(curves, key=lambda c: c[0]):
        ax.plot(x, y, marker=".", markersize=3, label=name)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{output_dir.name}: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = output_dir / "metric_curves.png"
    tmp = out.with_name(".metric_curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
