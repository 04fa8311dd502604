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

Registration is idempotent: re-importing (or reloading) the package does not register
the id twice.
"""

from __future__ import annotations

import gymnasium

from envs.navigation import NavigationEnv

NAVIGATION_ID = "rlft/Navigation-v0"

if NAVIGATION_ID not in gymnasium.registry:
    gymnasium.register(
        id=NAVIGATION_ID,
        entry_point="envs.navigation:NavigationEnv",
        max_episode_steps=50,
    )

__all__ = ["NAVIGATION_ID", "NavigationEnv"]
