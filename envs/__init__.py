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

* ``rlft/NaNReward-v0`` — :class:`envs.faults.NaNRewardEnv`, CartPole whose rewards
  turn NaN after ``nan_after_steps`` steps: a fault-injection env for testing the
  learners' NaN guard, not for training.

* ``rlft/ToolArithmetic-v0``, ``rlft/TextNavigation-v0``, ``rlft/GuessNumber-v0`` — text
  environments for LM agents (:class:`rlft_ray.agents.TextEnv`: text observations and
  actions, several model turns per episode; see README "Agents and tools"):
  :class:`envs.tool_arithmetic.ToolArithmeticEnv` (products with a calculator tool),
  :class:`envs.text_navigation.TextNavigationEnv` (grid navigation in words) and
  :class:`envs.guess_number.GuessNumberEnv` (higher / lower feedback).

Registration is idempotent: re-importing (or reloading) the package does not register
the id twice.
"""

from __future__ import annotations

import gymnasium

from envs.navigation import NavigationEnv

NAVIGATION_ID = "rlft/Navigation-v0"
NAN_REWARD_ID = "rlft/NaNReward-v0"

if NAVIGATION_ID not in gymnasium.registry:
    gymnasium.register(
        id=NAVIGATION_ID,
        entry_point="envs.navigation:NavigationEnv",
        max_episode_steps=50,
    )

if NAN_REWARD_ID not in gymnasium.registry:
    gymnasium.register(
        id=NAN_REWARD_ID,
        entry_point="envs.faults:NaNRewardEnv",
        max_episode_steps=500,
    )

#: The text environments (LM agents): id -> entry point. Each caps its own turns (max_turns).
TEXT_ENVS: dict[str, str] = {
    "rlft/ToolArithmetic-v0": "envs.tool_arithmetic:ToolArithmeticEnv",
    "rlft/TextNavigation-v0": "envs.text_navigation:TextNavigationEnv",
    "rlft/GuessNumber-v0": "envs.guess_number:GuessNumberEnv",
}
for _id, _entry in TEXT_ENVS.items():
    if _id not in gymnasium.registry:
        # no TimeLimit (max_turns is the env's own) and no passive checker: each step's text
        # is checked by the rollout, and gymnasium.utils.env_checker validates the classes
        gymnasium.register(id=_id, entry_point=_entry, disable_env_checker=True)

__all__ = ["NAN_REWARD_ID", "NAVIGATION_ID", "TEXT_ENVS", "NavigationEnv"]
