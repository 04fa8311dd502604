"""Two agents on the navigation square of :mod:`envs.navigation` that must both reach
their goals without colliding: a cooperative RLlib ``MultiAgentEnv``.

Each agent ``i`` is a point :math:`p^i_t \\in [-1, 1]^2` with its own goal :math:`g^i`,
moving as :class:`envs.navigation.NavigationEnv` does (8 compass moves of ``max_step``,
or a continuous move clipped to ``max_step`` per axis). Importing this module imports
RLlib (``pip install 'rlft-ray[rllib]'``); train it with ``algo: rllib`` and
``env.id: envs.multi_navigation:MultiNavigationEnv``.

**Observation** of agent ``i`` — ``Box(-1, 1, (6,), float32)``:
``[x_i, y_i, goal_x_i, goal_y_i, x_j, y_j]`` (its position, its goal, the other agent).

**Reward and termination** — after all acting agents moved:

* a collision (two agents, finished ones included, closer than ``collision_radius``)
  ends the episode for everyone; each acting agent gets ``-collision_penalty``;
* otherwise each acting agent gets :math:`-\\lVert p^i - g^i \\rVert_2` (as in the
  single-agent task) and is done once within ``goal_radius`` of its goal, where it stays
  (the other may still bump into it);
* the episode ends when both are done, or is truncated after ``max_steps`` steps.

``info`` of each agent carries ``distance``, ``collided`` and ``is_success``, which is
True when the agent reached its goal; the episode succeeded when both did (what
rlft-ray's RLlib callback reports as ``rollout/success_rate``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from ray.rllib.env.multi_agent_env import MultiAgentEnv

from envs.navigation import DISCRETE_DIRECTIONS, NUM_DIRECTIONS, _check_point, _check_real

AGENTS: tuple[str, str] = ("agent_0", "agent_1")


class MultiNavigationEnv(MultiAgentEnv):
    """Two cooperating point agents that must reach their own goals without colliding.

    Args:
        goals: One goal per agent, 2 numbers each inside ``[-1, 1]²``. The default goals
            sit diagonally opposite, so agents starting on the far side cross paths.
        action_type: ``"discrete"`` (8 compass moves) or ``"continuous"``.
        max_step: Length of a move, > 0.
        goal_radius: Success radius around a goal, in ``(0, 1]``.
        collision_radius: Agents closer than this collide, in ``[0, 1]``.
        collision_penalty: Reward of each acting agent on a collision, >= 0.
        max_steps: Steps before the episode is truncated, >= 1.

    Raises:
        ValueError: An invalid kwarg, named.
    """

    def __init__(
        self,
        goals: Any = ((0.5, 0.5), (-0.5, -0.5)),
        action_type: str = "discrete",
        max_step: float = 0.1,
        goal_radius: float = 0.1,
        collision_radius: float = 0.1,
        collision_penalty: float = 10.0,
        max_steps: int = 50,
    ) -> None:
        super().__init__()
        if len(goals) != len(AGENTS):
            raise ValueError(f"goals must hold {len(AGENTS)} points, got {len(goals)}")
        self.goals = np.stack([_check_point(f"goals[{i}]", g) for i, g in enumerate(goals)])
        if action_type not in ("discrete", "continuous"):
            raise ValueError(f"action_type must be 'discrete' or 'continuous', got {action_type!r}")
        self.action_type = action_type
        self.max_step = _check_real("max_step", max_step)
        self.goal_radius = _check_real("goal_radius", goal_radius)
        self.collision_radius = _check_real("collision_radius", collision_radius)
        self.collision_penalty = _check_real("collision_penalty", collision_penalty)
        if self.max_step <= 0 or not 0 < self.goal_radius <= 1:
            raise ValueError("max_step must be > 0 and goal_radius in (0, 1]")
        if not 0 <= self.collision_radius <= 1 or self.collision_penalty < 0:
            raise ValueError("collision_radius must be in [0, 1] and collision_penalty >= 0")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
        self.max_steps = int(max_steps)
        self.agents = self.possible_agents = list(AGENTS)
        obs_space = spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32)
        act_space: spaces.Space[Any] = (
            spaces.Discrete(NUM_DIRECTIONS)
            if action_type == "discrete"
            else spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        )
        self.observation_spaces = {a: obs_space for a in AGENTS}
        self.action_spaces = {a: act_space for a in AGENTS}
        self.positions = np.zeros((len(AGENTS), 2))
        self.done = [False] * len(AGENTS)
        self.t = 0
        self.rng = np.random.default_rng()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """Uniform starts, each outside its goal radius and apart from the other agent
        (``options={"starts": [[x0, y0], [x1, y1]]}`` places them instead)."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        starts = (options or {}).get("starts")
        if starts is not None:
            self.positions = np.stack(
                [_check_point(f"starts[{i}]", s) for i, s in enumerate(starts)]
            )
        else:
            while True:
                self.positions = self.rng.uniform(-1.0, 1.0, size=(len(AGENTS), 2))
                far_from_goals = np.all(self._distances() >= self.goal_radius)
                apart = (
                    np.linalg.norm(self.positions[0] - self.positions[1])
                    >= 2 * self.collision_radius
                )
                if far_from_goals and apart:
                    break
        self.done = [False] * len(AGENTS)
        self.t = 0
        self.agents = list(AGENTS)
        infos = {
            a: {"distance": float(d), "collided": False, "is_success": False}
            for a, d in zip(AGENTS, self._distances())
        }
        return {a: self._obs(i) for i, a in enumerate(AGENTS)}, infos

    def step(self, action_dict: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        """Move the acting agents, then score (see the module docstring)."""
        acting = [i for i, a in enumerate(AGENTS) if not self.done[i] and a in action_dict]
        for i in acting:
            move = self._move(action_dict[AGENTS[i]])
            self.positions[i] = np.clip(self.positions[i] + move, -1.0, 1.0)
        self.t += 1
        distances = self._distances()
        collided = bool(
            np.linalg.norm(self.positions[0] - self.positions[1]) < self.collision_radius
        )
        obs, rewards, terminateds, infos = {}, {}, {}, {}
        for i in acting:
            a = AGENTS[i]
            reached = bool(distances[i] < self.goal_radius) and not collided
            self.done[i] = reached or collided
            obs[a] = self._obs(i)
            rewards[a] = -self.collision_penalty if collided else -float(distances[i])
            terminateds[a] = self.done[i]
            infos[a] = {
                "distance": float(distances[i]),
                "collided": collided,
                "is_success": reached,
            }
        terminateds["__all__"] = collided or all(self.done)
        truncated = self.t >= self.max_steps and not terminateds["__all__"]
        truncateds = {AGENTS[i]: truncated for i in acting} | {"__all__": truncated}
        self.agents = [a for i, a in enumerate(AGENTS) if not self.done[i]]
        return obs, rewards, terminateds, truncateds, infos

    def _move(self, action: Any) -> np.ndarray:
        if self.action_type == "discrete":
            k = int(action)
            if not 0 <= k < NUM_DIRECTIONS:
                raise ValueError(
                    f"discrete action must be in [0, {NUM_DIRECTIONS}), got {action!r}"
                )
            return self.max_step * DISCRETE_DIRECTIONS[k]
        return self.max_step * np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)

    def _distances(self) -> np.ndarray:
        return np.linalg.norm(self.positions - self.goals, axis=1)

    def _obs(self, i: int) -> np.ndarray:
        other = self.positions[1 - i]
        return np.concatenate([self.positions[i], self.goals[i], other]).astype(np.float32)
