"""Algorithm name -> learner class. The loop looks algorithms up here, never by ``if``.

Each learner module is imported only when its algorithm is asked for: a CartPole run does
not pay for importing transformers (about 2 s on the driver and again on each learner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def algorithm_names() -> list[str]:
    """Registered algorithm names, as accepted by ``algo:``."""
    return sorted(_LEARNERS)


def get_learner_cls(name: str) -> type[Learner]:
    """The learner class registered as ``name`` (its module imported now)."""
    module, cls = _LEARNERS[name].split(":")
    return getattr(importlib.import_module(module), cls)
