"""Algorithm name -> learner class. The loop looks algorithms up here, never by ``if``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlft_ray.learners.base import Learner


def _algorithms() -> dict[str, type[Learner]]:
    from rlft_ray.learners.dpo import DPOLearner
    from rlft_ray.learners.dqn import DQNLearner
    from rlft_ray.learners.filtered_bc import FilteredBCLearner
    from rlft_ray.learners.grpo import GRPOLearner
    from rlft_ray.learners.lm_ppo import LMPPOLearner
    from rlft_ray.learners.online_dpo import OnlineDPOLearner
    from rlft_ray.learners.ppo import PPOLearner
    from rlft_ray.learners.reward_model import RewardModelLearner
    from rlft_ray.learners.rsft import RSFTLearner

    return {
        "ppo": PPOLearner,
        "dpo": DPOLearner,
        "dqn": DQNLearner,
        "filtered_bc": FilteredBCLearner,
        "grpo": GRPOLearner,
        "lm_ppo": LMPPOLearner,
        "online_dpo": OnlineDPOLearner,
        "reward_model": RewardModelLearner,
        "rsft": RSFTLearner,
    }


def algorithm_names() -> list[str]:
    """Registered algorithm names, as accepted by ``algo:``."""
    return sorted(_algorithms())


def get_learner_cls(name: str) -> type[Learner]:
    """The learner class registered as ``name``."""
    return _algorithms()[name]
