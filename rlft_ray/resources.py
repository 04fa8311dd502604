"""Checking that a run fits the cluster before asking Ray for anything."""

from __future__ import annotations

from collections.abc import Mapping

from rlft_ray.config import ResourcesConfig


class ResourceError(RuntimeError):
    """The requested actors and learners cannot be placed; the message has the numbers."""


def check_fits(res: ResourcesConfig, available: Mapping[str, float]) -> None:
    """Fail fast (instead of hanging on unschedulable work) when the run cannot be placed.

    Args:
        res: What the run asks for.
        available: ``ray.cluster_resources()`` (or a node's resources).

    Raises:
        ResourceError: e.g. "needs 3 CPUs (2 rollout actors x 0.5 + 2 learners x 1), cluster has 2".
    """
    need_cpu = res.total_cpus
    have_cpu = float(available.get("CPU", 0.0))
    if need_cpu > have_cpu + 1e-9:
        raise ResourceError(
            f"run needs {need_cpu:g} CPUs ({res.num_rollout_actors} rollout actors x "
            f"{res.cpus_per_rollout_actor:g} + {res.num_learners} learners x {res.cpus_per_learner:g}), "
            f"cluster has {have_cpu:g}; lower resources.num_rollout_actors / cpus_per_rollout_actor / "
            "num_learners / cpus_per_learner or add nodes"
        )
    custom = set(res.rollout_actor_resources) | set(res.learner_resources)
    for name in sorted(custom):
        need = res.num_rollout_actors * res.rollout_actor_resources.get(
            name, 0.0
        ) + res.num_learners * res.learner_resources.get(name, 0.0)
        have = float(available.get(name, 0.0))
        if need > have + 1e-9:
            raise ResourceError(
                f"run needs {need:g} of custom resource '{name}' (resources.rollout_actor_resources / "
                f"learner_resources), cluster has {have:g}; start nodes with --resources='{{\"{name}\": N}}' "
                "or drop the requirement"
            )
    have_gpu = float(available.get("GPU", 0.0))
    if res.use_gpu and res.num_learners > have_gpu + 1e-9:
        raise ResourceError(
            f"resources.use_gpu=true needs {res.num_learners} GPU(s) for {res.num_learners} learner(s), "
            f"cluster has {have_gpu:g}; set resources.use_gpu=false or add GPU nodes"
        )
    rollout_gpus = res.num_rollout_actors * res.gpus_per_rollout_actor
    learner_gpus = res.num_learners if res.use_gpu else 0
    if rollout_gpus > 0 and rollout_gpus + learner_gpus > have_gpu + 1e-9:
        raise ResourceError(
            f"resources.gpus_per_rollout_actor={res.gpus_per_rollout_actor:g} needs {rollout_gpus:g} GPU(s) for "
            f"{res.num_rollout_actors} rollout actors (+ {learner_gpus} for learners), cluster has {have_gpu:g}; "
            "set resources.gpus_per_rollout_actor=0 or add GPU nodes"
        )
