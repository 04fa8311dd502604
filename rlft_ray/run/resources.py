"""What a run asks of the cluster, checked before asking Ray for anything.

:func:`run_needs` (what one run holds), :func:`check_fits` (fail with the numbers instead
of hanging on unschedulable work) and :func:`runs_that_fit` (how many Tune trials run at
once). Pure arithmetic on :class:`~rlft_ray.config.ResourcesConfig`; the Ray session itself
is :mod:`rlft_ray.run.ray_session`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from rlft_ray.config import ResourcesConfig


class ResourceError(RuntimeError):
    """The requested actors and learners cannot be placed; the message has the numbers."""


def rollout_bundle(res: ResourcesConfig) -> dict[str, float]:
    """What one rollout actor holds (CPU, GPU where set, custom resources)."""
    bundle = {"CPU": res.cpus_per_rollout_actor, **res.rollout_actor_resources}
    if res.gpus_per_rollout_actor > 0:
        bundle["GPU"] = res.gpus_per_rollout_actor
    return bundle


def scorer_gpus(res: ResourcesConfig, cluster_gpus: float) -> float:
    """GPUs each reward-model scorer actor holds: as set, else a 0.1 share on a GPU cluster."""
    if res.gpus_per_scorer_actor is not None:
        return res.gpus_per_scorer_actor
    return 0.1 if cluster_gpus > 0 else 0.0


def run_needs(
    res: ResourcesConfig,
    learners: bool = True,
    actors: bool = True,
    scorers: bool = False,
    cluster_gpus: float = 0.0,
) -> dict[str, float]:
    """Everything one run holds: rollout actors, learners and reward-model scorer actors,
    each when the run has them; no zeros."""
    n_learn = res.num_learners if learners else 0
    n_act = res.num_rollout_actors if actors else 0
    n_score = res.num_scorer_actors if scorers else 0
    needs = {
        "CPU": n_act * res.cpus_per_rollout_actor
        + n_learn * res.cpus_per_learner
        + n_score * res.cpus_per_scorer_actor,
        "GPU": n_act * res.gpus_per_rollout_actor
        + (n_learn if res.use_gpu else 0)
        + n_score * scorer_gpus(res, cluster_gpus),
    }
    for name in set(res.rollout_actor_resources) | set(res.learner_resources):
        needs[name] = n_act * res.rollout_actor_resources.get(
            name, 0.0
        ) + n_learn * res.learner_resources.get(name, 0.0)
    return {k: v for k, v in needs.items() if v > 0}


def check_fits(
    res: ResourcesConfig,
    available: Mapping[str, float],
    learners: bool = True,
    actors: bool = True,
    scorers: bool = False,
) -> None:
    """Fail fast (instead of hanging on unschedulable work) when the run cannot be placed.

    Args:
        res: What the run asks for.
        available: ``ray.cluster_resources()`` (or a node's resources).
        learners: Count the learners (False: a job of rollout actors only, ``rlft-ray sample``).
        actors: Count the rollout actors (False: a learner without any, e.g. a reward model).
        scorers: Count the reward-model scorer actors (``lm.reward_model`` is set).

    Raises:
        ResourceError: e.g. "needs 3 CPUs (2 rollout actors x 0.5 + 2 learners x 1), cluster has 2".
    """
    needs = run_needs(res, learners, actors, scorers, float(available.get("GPU", 0.0)))
    have_cpu = float(available.get("CPU", 0.0))
    if needs.get("CPU", 0.0) > have_cpu + 1e-9:
        parts = [
            f"{res.num_rollout_actors} rollout actors x {res.cpus_per_rollout_actor:g}" * actors,
            f"{res.num_learners} learners x {res.cpus_per_learner:g}" * learners,
            f"{res.num_scorer_actors} scorer actors x {res.cpus_per_scorer_actor:g}" * scorers,
        ]
        raise ResourceError(
            f"run needs {needs['CPU']:g} CPUs ({' + '.join(p for p in parts if p)}), cluster "
            f"has {have_cpu:g}; lower resources.num_rollout_actors / cpus_per_rollout_actor / "
            "num_learners / cpus_per_learner or add nodes"
        )
    for name in sorted(set(res.rollout_actor_resources) | set(res.learner_resources)):
        have = float(available.get(name, 0.0))
        if needs.get(name, 0.0) > have + 1e-9:
            raise ResourceError(
                f"run needs {needs[name]:g} of custom resource '{name}' (resources.rollout_actor_resources / "
                f"learner_resources), cluster has {have:g}; start nodes with --resources='{{\"{name}\": N}}' "
                "or drop the requirement"
            )
    have_gpu = float(available.get("GPU", 0.0))
    if learners and res.use_gpu and res.num_learners > have_gpu + 1e-9:
        raise ResourceError(
            f"resources.use_gpu=true needs {res.num_learners} GPU(s) for {res.num_learners} learner(s), "
            f"cluster has {have_gpu:g}; set resources.use_gpu=false or add GPU nodes"
        )
    rollout_gpus = res.num_rollout_actors * res.gpus_per_rollout_actor if actors else 0.0
    learner_gpus = res.num_learners if learners and res.use_gpu else 0
    if rollout_gpus > 0 and rollout_gpus + learner_gpus > have_gpu + 1e-9:
        raise ResourceError(
            f"resources.gpus_per_rollout_actor={res.gpus_per_rollout_actor:g} needs {rollout_gpus:g} GPU(s) for "
            f"{res.num_rollout_actors} rollout actors (+ {learner_gpus} for learners), cluster has {have_gpu:g}; "
            "set resources.gpus_per_rollout_actor=0 or add GPU nodes"
        )
    if needs.get("GPU", 0.0) > have_gpu + 1e-9:
        raise ResourceError(
            f"run needs {needs['GPU']:g} GPUs (learners, rollout actors and reward-model scorers "
            f"together), cluster has {have_gpu:g}; lower resources.gpus_per_rollout_actor / "
            "gpus_per_scorer_actor or add GPU nodes"
        )


def runs_that_fit(res: ResourcesConfig, want: int | None, cluster: Mapping[str, float]) -> int:
    """How many runs of ``res`` (Tune trials) hold their resources at once on ``cluster``.

    Args:
        res: One run's resources.
        want: The runs asked for at once (``max_concurrent_trials``); None: as many as fit.
        cluster: ``ray.cluster_resources()``.

    Raises:
        ResourceError: One run does not fit, or ``want`` runs do not (with the numbers).
    """
    check_fits(res, cluster)
    needs = run_needs(res)
    fits = {k: math.floor(float(cluster.get(k, 0.0)) / v + 1e-9) for k, v in needs.items()}
    limit = min(fits, key=fits.get)
    fit = max(1, fits[limit])
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
