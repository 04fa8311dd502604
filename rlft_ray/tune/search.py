"""Running a search: Ray start-up, scheduler and search algorithm, the ``Tuner``.

Layout of ``--output-dir``::

    spec.yaml             the spec, with run_config made absolute
    tune/                 Ray Tune's experiment (trial results, Tune checkpoints)
    trials/<id>/run<k>/   each trial's run directories (metrics.jsonl, checkpoint_best, ...)
    results.csv           one row per trial: config, metric, iterations, status, error
    best.json             best trial: dotted overrides, metric, checkpoint path
    metric_curves.png     the metric against iterations, one line per trial
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from rlft_ray.config import ConfigError, RunConfig, from_dict
from rlft_ray.core.fileio import atomic_write_text
from rlft_ray.run.ray_session import init_ray
from rlft_ray.run.resources import rollout_bundle, runs_that_fit
from rlft_ray.run.tracking import check_tracking
from rlft_ray.tune.results import best_of, collect_rows, count_exploits, write_results
from rlft_ray.tune.spec import Dimension, SpecError, TuneSpec, load_spec
from rlft_ray.tune.trial import COMPLETED_KEY, _run_trial, _trial_dirname, _TrialContext

EXPERIMENT_NAME = "tune"


def _clip_explored(config: dict[str, Any], dims: tuple[Dimension, ...]) -> dict[str, Any]:
    """PBT ``custom_explore_fn``: perturbed numbers stay inside the search space."""
    for dim in dims:
        if dim.key in config:
            config[dim.key] = dim.clip(config[dim.key])
    return config


def build_scheduler(spec: TuneSpec) -> Any:
    """The Tune scheduler for ``spec.scheduler`` (metric/mode come from the TuneConfig)."""
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

    res = spec.base_config.resources
    return PlacementGroupFactory(
        [{}] + [rollout_bundle(res) for _ in range(res.num_rollout_actors)]
    )


def check_concurrency(spec: TuneSpec, cluster: Mapping[str, float]) -> int:
    """How many trials run at once (:func:`~rlft_ray.run.resources.runs_that_fit`).

    Raises:
        ResourceError: One trial does not fit, or ``max_concurrent_trials`` trials do not.
    """
    return runs_that_fit(spec.base_config.resources, spec.max_concurrent_trials, cluster)


def _require_dashboard() -> None:
    """asha/pbt stop trials; Ray Train frees a stopped trial's learners through the state API.

    Raises:
        RunError: Ray runs without its dashboard (the learners' CPUs would leak).
    """
    from rlft_ray.run.driver import RunError

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
        RunError: asha/pbt on a Ray instance without a dashboard.
    """
    import ray

    started = time.perf_counter()
    spec = load_spec(spec_path)
    output_dir = Path(output_dir).resolve()
    _check_output_dir(spec, spec_path, output_dir, resume)
    check_tracking(spec.base_config.tracking)  # no tracker package / unwritable store: now
    # Tune warns each time a checkpoint forces an experiment-state snapshot; with
    # frequent small checkpoints that is noise, not a bottleneck.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    stops_trials = spec.scheduler.type != "fifo"
    init_ray(address, dashboard=stops_trials)
    if stops_trials:
        _require_dashboard()
    concurrency = check_concurrency(spec, ray.cluster_resources())
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "spec.yaml", yaml.safe_dump(spec.as_dict(), sort_keys=False))

    storage = spec.storage_path or str(output_dir)
    name = EXPERIMENT_NAME if not spec.storage_path else f"{output_dir.name}-{EXPERIMENT_NAME}"
    exp_path = f"{storage.rstrip('/')}/{name}"
    tuner = _make_tuner(spec, output_dir, storage, name, exp_path, concurrency, resume, verbose)
    grid = tuner.fit()
    rows = collect_rows(grid, spec)
    best = best_of(grid, spec)
    exploits = count_exploits(exp_path) if spec.scheduler.type == "pbt" else 0
    files = write_results(output_dir, spec, rows, best, grid)
    return SearchResult(
        output_dir, spec.metric, rows, best, time.perf_counter() - started, exploits, files
    )


def _check_output_dir(
    spec: TuneSpec, spec_path: str | Path, output_dir: Path, resume: bool
) -> None:
    """``--resume`` needs the same spec in ``output_dir``; a new search needs an empty one."""
    saved = output_dir / "spec.yaml"
    if resume:
        if not saved.is_file():
            raise SpecError("--resume", f"{output_dir} holds no search to resume (no spec.yaml)")
        if _normalised(yaml.safe_load(saved.read_text())) != _normalised(spec.as_dict()):
            raise SpecError(
                "--resume",
                f"{spec_path} differs from the spec the search started with ({saved}); resume with that file",
            )
    elif saved.exists() or (output_dir / EXPERIMENT_NAME).exists():
        raise SpecError(
            "--output-dir",
            f"{output_dir} already holds a search; pass --resume to continue it or choose another --output-dir",
        )


def _normalised(data: Any) -> Any:
    """A saved or current spec as a comparable mapping: every field with its default filled
    in (so a spec.yaml that lists only the keys written, as older searches saved it,
    compares equal to the same spec with defaults)."""
    try:
        return from_dict(TuneSpec, data).with_defaults().as_dict()
    except ConfigError:
        return data


def _make_tuner(
    spec: TuneSpec,
    output_dir: Path,
    storage: str,
    name: str,
    exp_path: str,
    concurrency: int,
    resume: bool,
    verbose: int,
) -> Any:
    """A new ``Tuner`` for the spec, or the interrupted one restored from ``exp_path``."""
    from ray import tune

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
    if resume:
        if not tune.Tuner.can_restore(exp_path):
            raise SpecError("--resume", f"no Tune experiment to restore at {exp_path}")
        return tune.Tuner.restore(
            exp_path, trainable=trainable, resume_unfinished=True, resume_errored=False
        )
    return tune.Tuner(
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
            callbacks=tracker_callbacks(spec.base_config, name),
        ),
    )


def tracker_callbacks(cfg: RunConfig, experiment: str) -> list[Any]:
    """Ray Tune's own logger callbacks for the base config's ``tracking.mlflow_uri`` /
    ``tracking.wandb_project``: one tracker run per trial, its sampled hyperparameters
    as parameters, every reported metric. (Each trial's run directory also gets its
    TensorBoard files.)"""
    callbacks: list[Any] = []
    t = check_tracking(cfg.tracking)
    if t.mlflow_uri is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(tracking_uri=t.mlflow_uri, experiment_name=t.mlflow_experiment)
        )
    if t.wandb_project is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(project=t.wandb_project, group=experiment, mode=t.wandb_mode)
        )
    return callbacks
