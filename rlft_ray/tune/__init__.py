"""Hyperparameter search with Ray Tune over run configs (``rlft-ray tune SPEC``).

A spec (``tuning/*.yaml``) names a run config and a search space over its fields by
the same dotted names as CLI overrides. The package's rooms:

* :mod:`.spec` — the spec schema (:class:`TuneSpec`) and its validation, before Ray;
* :mod:`.trial` — the Tune function that runs one trial's training and reports it;
* :mod:`.search` — Ray start-up, schedulers, search algorithms, :func:`run_search`;
* :mod:`.results` — the per-trial table, ``results.csv``, ``best.json``, the plot.
"""

from rlft_ray.tune.results import best_of, collect_rows, format_table, write_results
from rlft_ray.tune.search import (
    EXPERIMENT_NAME,
    SearchResult,
    build_scheduler,
    build_search_alg,
    check_concurrency,
    run_search,
    trial_resources,
)
from rlft_ray.tune.spec import Dimension, SchedulerSpec, SearchSpec, SpecError, TuneSpec, load_spec
from rlft_ray.tune.trial import COMPLETED_KEY, TuneBridgeCallback

__all__ = [
    "COMPLETED_KEY",
    "EXPERIMENT_NAME",
    "Dimension",
    "SchedulerSpec",
    "SearchResult",
    "SearchSpec",
    "SpecError",
    "TuneBridgeCallback",
    "TuneSpec",
    "best_of",
    "build_scheduler",
    "build_search_alg",
    "check_concurrency",
    "collect_rows",
    "format_table",
    "load_spec",
    "run_search",
    "trial_resources",
    "write_results",
]
