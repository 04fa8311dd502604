"""Algorithm name -> learner class. The loop looks algorithms up here, never by ``if``.

Each learner module is imported only when its algorithm is asked for: a CartPole run does
not pay for importing transformers (about 2 s on the driver and again on each learner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlft_ray.config import RunConfig
    from rlft_ray.learners.base import Learner

#: ``algo`` -> ``module:class`` of its learner.
_LEARNERS: dict[str, str] = {
    "dpo": "rlft_ray.learners.dpo:DPOLearner",
    "dqn": "rlft_ray.learners.dqn:DQNLearner",
    "filtered_bc": "rlft_ray.learners.filtered_bc:FilteredBCLearner",
    "grpo": "rlft_ray.learners.grpo:GRPOLearner",
    "lm_ppo": "rlft_ray.learners.lm_ppo:LMPPOLearner",
    "online_dpo": "rlft_ray.learners.online_dpo:OnlineDPOLearner",
    "ppo": "rlft_ray.learners.ppo:PPOLearner",
    "reward_model": "rlft_ray.learners.reward_model:RewardModelLearner",
    "rsft": "rlft_ray.learners.rsft:RSFTLearner",
}


GENERATION_MODULE = "rlft_ray.rollout.generation"
_ENV_RUNNER = "rlft_ray.rollout.env_runner"
#: ``algo`` -> module of its rollout actor class (``Learner.sampler``; a test keeps the two
#: in step), named without importing the learner (see :func:`rollout_module`).
_ROLLOUT_MODULES: dict[str, str | None] = {
    "dpo": GENERATION_MODULE,  # only with eval_every (held-out prompts)
    "dqn": _ENV_RUNNER,
    "filtered_bc": "rlft_ray.rollout.episodes",
    "grpo": GENERATION_MODULE,
    "lm_ppo": GENERATION_MODULE,
    "online_dpo": GENERATION_MODULE,
    "ppo": _ENV_RUNNER,
    "reward_model": None,  # learns from pairs
    "rsft": GENERATION_MODULE,
}


def rollout_module(cfg: RunConfig) -> str | None:
    """The module of the rollout actor class ``cfg``'s run starts (None: no actors),
    without importing torch: Ray's first worker processes import it while the driver
    still imports and checks the task."""
    if cfg.algo == "dpo" and cfg.eval_every is None:
        return None
    return _ROLLOUT_MODULES[cfg.algo]


def algorithm_names() -> list[str]:
    """Registered algorithm names, as accepted by ``algo:``."""
    return sorted(_LEARNERS)


def get_learner_cls(name: str) -> type[Learner]:
    """The learner class registered as ``name`` (its module imported now)."""
    module, cls = _LEARNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
