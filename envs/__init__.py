"""Gymnasium environments shipped with rlft_ray.

Importing this package registers:

* ``rlft/Navigation-v0`` — :class:`envs.navigation.NavigationEnv`, a 2-D point that
  must reach a goal on ``[-1, 1]²`` (reward = -distance to the goal), with a
  ``TimeLimit`` of 50 steps. Kwargs (``goal``, ``action_type``, ``max_step``,
  ``goal_radius``, ``render_mode``) pass through ``gymnasium.make``::

      import gymnasium as gym
      import envs  # noqa: F401  (registers the ids)

      env = gym.make("rlft/Navigation-v0", goal=(-0.5, 0.2), action_type="discrete")

  Without the explicit import, ``gym.make("envs:rlft/Navigation-v0")`` imports this
  package first.

* ``rlft/CartPole-v1`` — :class:`envs.cartpole_variant.CartPoleVariantEnv`, CartPole-v1
  with ``gravity``, ``length`` (half the pole), ``masspole`` and ``force_mag`` as kwargs:
  the changed env of the fine-tuning benchmarks (500-step limit, as CartPole-v1).

* ``envs.multi_navigation:MultiNavigationEnv`` (not registered: an RLlib ``MultiAgentEnv``,
  imported by its entry point under ``algo: rllib``) — two agents that must both reach
  their goals on the navigation square without colliding; ``envs.multi_navigation_pz`` is
  the same task as a PettingZoo ``ParallelEnv``.

* ``rlft/NaNReward-v0`` — :class:`envs.faults.NaNRewardEnv`, CartPole whose rewards
  turn NaN after ``nan_after_steps`` steps: a fault-injection env for testing the
  learners' NaN guard, not for training.

Registration is idempotent: re-importing (or reloading) the package does not register
the id twice.
"""

from __future__ import annotations

import gymnasium

from envs.navigation import NavigationEnv

NAVIGATION_ID = "rlft/Navigation-v0"
NAN_REWARD_ID = "rlft/NaNReward-v0"
CARTPOLE_ID = "rlft/CartPole-v1"

if NAVIGATION_ID not in gymnasium.registry:
    gymnasium.register(
        id=NAVIGATION_ID,
        entry_point="envs.navigation:NavigationEnv",
        max_episode_steps=50,
    )

if CARTPOLE_ID not in gymnasium.registry:
    gymnasium.register(
        id=CARTPOLE_ID,
        entry_point="envs.cartpole_variant:CartPoleVariantEnv",
        max_episode_steps=500,
        reward_threshold=475.0,
    )

if NAN_REWARD_ID not in gymnasium.registry:
    gymnasium.register(
        id=NAN_REWARD_ID,
        entry_point="envs.faults:NaNRewardEnv",
        max_episode_steps=500,
    )

__all__ = ["CARTPOLE_ID", "NAN_REWARD_ID", "NAVIGATION_ID", "NavigationEnv"]
