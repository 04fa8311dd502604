"""Pure-torch losses and advantage estimators.

Every function here takes tensors and explicit coefficients and returns tensors;
nothing in this package imports ``ray`` or reads a config object.
"""

from rlft_ray.algorithms.advantages import compute_gae, normalize_advantages
from rlft_ray.algorithms.dqn import dqn_loss, dqn_targets, linear_schedule, polyak_update
from rlft_ray.algorithms.ppo import ppo_policy_loss, ppo_value_loss

__all__ = [
    "compute_gae",
    "dqn_loss",
    "dqn_targets",
    "linear_schedule",
    "normalize_advantages",
    "polyak_update",
    "ppo_policy_loss",
    "ppo_value_loss",
]
