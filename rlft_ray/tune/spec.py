"""Tuning specs: the schema of a ``tuning/*.yaml`` file and its validation.

A spec names a run config and a search space over that config's fields, addressed by
the same dotted names as CLI overrides::

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
dimension is put through :func:`rlft_ray.config.build_config`, so a misspelled field
or an ill-typed value fails with the key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from rlft_ray.config import ConfigError, RunConfig, build_config, from_dict, load_yaml, to_dict

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
#: Tune's own time attributes, allowed next to the run's ``counters/*`` and ``time/*``.
_TUNE_TIME_ATTRS = ("training_iteration", "time_total_s")


class SpecError(ConfigError):
    """A tuning spec is invalid; the message names the spec key (e.g. ``search_space.ppo.lr``)."""


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
    """A tuning spec: the top level of a spec file (parsed with :func:`~rlft_ray.config.from_dict`).

    :func:`load_spec` makes ``run_config`` absolute and fills ``keep_checkpoints``; the
    search space, fixed overrides and base config derived from the fields are
    properties, so the file's keys and the validated spec are one schema.

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

    run_config: Path | None = None
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
        if self.run_config is None:
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

    @cached_property
    def dimensions(self) -> tuple[Dimension, ...]:
        """The search space, parsed (raises :class:`SpecError` naming the dimension)."""
        return tuple(_parse_dimension(k, v) for k, v in self.search_space.items())

    @property
    def keys(self) -> list[str]:
        """The searched dotted keys."""
        return [d.key for d in self.dimensions]

    @property
    def fixed(self) -> dict[str, Any]:
        """Dotted overrides every trial gets (``overrides`` plus ``resources.*``)."""
        fixed = {str(k): v for k, v in self.overrides.items()}
        fixed.update({f"resources.{k}": v for k, v in self.resources.items()})
        return fixed

    @cached_property
    def base(self) -> dict[str, Any]:
        """The run config with :attr:`fixed` applied, as a nested mapping (absolute ``init_from``)."""
        base = to_dict(build_config(self.run_config, self.fixed))
        if base["init_from"] and not Path(base["init_from"]).is_absolute():
            # Trials run in Tune's trial directory; a relative path would point elsewhere.
            base["init_from"] = str(Path(base["init_from"]).resolve())
        return base

    @property
    def base_config(self) -> RunConfig:
        """:attr:`base` as a :class:`~rlft_ray.config.RunConfig`."""
        return build_config(base=self.base)

    def trial_config(self, sampled: Mapping[str, Any]) -> RunConfig:
        """The :class:`~rlft_ray.config.RunConfig` of one trial."""
        return build_config(base=self.base, overrides=dict(sampled))

    def overrides_for(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Every dotted override (fixed and searched) that reproduces a trial from ``run_config``."""
        return {**self.fixed, **{k: sampled[k] for k in self.keys if k in sampled}}

    def with_defaults(self) -> TuneSpec:
        """The spec with ``keep_checkpoints`` filled in: 3, or all (None) under PBT, where a
        trial told to exploit may wait (paused) for a free slot while its source keeps
        checkpointing, and Tune refuses to restore a deleted one."""
        if self.keep_checkpoints is not None or self.scheduler.type == "pbt":
            return self
        return dataclasses.replace(self, keep_checkpoints=3)

    def as_dict(self) -> dict[str, Any]:
        """The spec as a plain mapping (saved as the search's ``spec.yaml``)."""
        return to_dict(self)


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
        spec: TuneSpec = from_dict(TuneSpec, load_yaml(path))
    except ConfigError as exc:
        if not exc.key:  # the file itself: missing or not YAML
            raise SpecError("", str(exc).replace("run file", "spec file")) from None
        raise SpecError(exc.key, exc.reason) from None
    run_config = Path(spec.run_config).expanduser()
    if not run_config.is_absolute():
        run_config = (path.parent / run_config).resolve()
    if not run_config.is_file():
        raise SpecError(
            "run_config", f"run file not found: {run_config} (paths are relative to the spec file)"
        )
    spec = dataclasses.replace(spec, run_config=run_config).with_defaults()
    _check_configs(spec)
    _check_combination(spec, spec.dimensions)
    return spec


def _check_configs(spec: TuneSpec) -> None:
    """The run file, the fixed overrides and a sample of every dimension all build a config."""
    try:
        build_config(spec.run_config)
    except ConfigError as exc:
        raise SpecError("run_config", f"{spec.run_config}: {exc}") from None
    try:
        base = spec.base
    except ConfigError as exc:
        # resources.* keys name themselves; anything else came from overrides:.
        where = exc.key if exc.key.startswith("resources.") else f"overrides.{exc.key}"
        raise SpecError(where, exc.reason) from None
    fixed = spec.fixed
    for dim in spec.dimensions:
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


def _check_combination(parsed: TuneSpec, dims: tuple[Dimension, ...]) -> None:
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
