"""Early stop on reward over-optimisation (``stop_on_overoptimization``).

A policy trained against a learned reward first gets better, then games the reward model:
its learned reward keeps rising while the true held-out metric and the reward model's
held-out ranking (``eval/reward_model_auc``) fall (Gao et al. 2023, "Scaling Laws for
Reward Model Overoptimization"). The rule: stop once a watched held-out metric has fallen
at each of the last K evaluations (K + 1 values, each strictly below the one before).
``checkpoint_best``, chosen by the held-out metric, keeps the policy from before the fall.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

#: The learned reward's held-out ranking of correct over wrong completions.
AUC_METRIC = "eval/reward_model_auc"


def watched_metrics(best_metric: str) -> tuple[str, ...]:
    """The held-out metrics the rule watches: the run's true metric (what chooses
    ``checkpoint_best``, e.g. ``eval/accuracy``) and ``eval/reward_model_auc``."""
    return tuple(dict.fromkeys((best_metric, AUC_METRIC)))


def fallen_metric(
    evaluations: Sequence[Mapping[str, Any]], falls: int, metrics: Sequence[str]
) -> str | None:
    """The first of ``metrics`` that fell at each of its last ``falls`` evaluations, or None.

    Args:
        evaluations: The held-out evaluations so far, oldest first (rows of metrics; a row
            without a metric does not count for it, e.g. an AUC with no wrong completion).
        falls: K >= 1.
        metrics: Metric names to watch.

    Returns:
        The name of a metric whose last K + 1 values are strictly decreasing, or None.
    """
    if falls < 1:
        raise ValueError(f"falls must be >= 1, got {falls}")
    for name in metrics:
        values = [float(e[name]) for e in evaluations if name in e]
        tail = values[-(falls + 1) :]
        if len(tail) == falls + 1 and all(b < a for a, b in itertools.pairwise(tail)):
            return name
    return None


def overoptimization_stop(
    rows: Sequence[Mapping[str, Any]], falls: int, metrics: Sequence[str]
) -> dict[str, Any] | None:
    """Where the rule stopped a run, read back from its ``metrics.jsonl`` rows (for
    ``summary.json``): the first evaluation at which :func:`fallen_metric` fires.

    Returns:
        ``{"reason": "overoptimization", "iteration", "metric", "values", "falls"}`` or None.
    """
    seen: list[Mapping[str, Any]] = []
    for row in rows:
        if not any(name in row for name in metrics):
            continue
        seen.append(row)
        name = fallen_metric(seen, falls, metrics)
        if name is not None:
            values = [round(float(e[name]), 4) for e in seen if name in e][-(falls + 1) :]
            return {
                "reason": "overoptimization",
                "iteration": row.get("counters/iteration"),
                "metric": name,
                "values": values,
                "falls": falls,
            }
    return None
