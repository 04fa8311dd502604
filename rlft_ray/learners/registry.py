"""Algorithm name -> learner class and rollout actors, read off the one algorithm table
(:data:`rlft_ray.config.algorithms.SPECS`). The loop looks algorithms up here, never by ``if``.

Each learner module is imported only when its algorithm is asked for: a CartPole run does
not pay for importing transformers (about 2 s on the driver and again on each learner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rlft_ray.config.algorithms import ALGORITHMS, ROLLOUT_ACTORS, algorithm_spec

if TYPE_CHECKING:
    from rlft_ray.config import RunConfig
    from rlft_ray.learners.base import Learner

#: The module of the generation actors (what the LM quickstart preloads before its config exists).
GENERATION_MODULE = ROLLOUT_ACTORS["generation"].split(":")[0]


def _import(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def rollout_actor(cfg: RunConfig) -> str | None:
    """``module:class`` of the rollout actors ``cfg``'s run starts (None: no actors)."""
    spec = algorithm_spec(cfg.algo)
    if spec.rollout is None or (spec.rollout_for_eval_only and cfg.eval_every is None):
        return None
    return ROLLOUT_ACTORS[spec.rollout]


def rollout_module(cfg: RunConfig) -> str | None:
    """The module of the rollout actor class ``cfg``'s run starts (None: no actors),
    without importing torch: Ray's first worker processes import it while the driver
    still imports and checks the task."""
    actor = rollout_actor(cfg)
    return actor.split(":")[0] if actor else None


def rollout_actor_cls(cfg: RunConfig) -> type | None:
    """The plain rollout actor class of ``cfg``'s run (its module imported now)."""
    actor = rollout_actor(cfg)
    return _import(actor) if actor else None


def algorithm_names() -> list[str]:
    """Registered algorithm names, as accepted by ``algo:``."""
    return sorted(ALGORITHMS)


def get_learner_cls(name: str) -> type[Learner]:
    """The learner class registered as ``name`` (its module imported now)."""
    return _import(algorithm_spec(name).learner)
