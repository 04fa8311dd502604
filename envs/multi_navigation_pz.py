"""The two-agent navigation task of :mod:`envs.multi_navigation` as a PettingZoo
``ParallelEnv`` (the same dynamics, rewards and infos), so PettingZoo users, and the
tests of rlft-ray's PettingZoo path, have one to hand: ``env.id:
envs.multi_navigation_pz:MultiNavigationParallelEnv`` under ``algo: rllib`` (RLlib's
``ParallelPettingZooEnv`` wraps it). Needs ``pettingzoo`` (``rlft-ray[rllib]``).
"""

from __future__ import annotations

from typing import Any

from pettingzoo import ParallelEnv

from envs.multi_navigation import AGENTS, MultiNavigationEnv


class MultiNavigationParallelEnv(ParallelEnv):
    """:class:`~envs.multi_navigation.MultiNavigationEnv` through PettingZoo's parallel API:
    an agent leaves ``agents`` after the step that ends it; kwargs as that class's."""

    metadata = {"name": "multi_navigation_v0", "render_modes": []}

    def __init__(self, **kwargs: Any) -> None:
        self.core = MultiNavigationEnv(**kwargs)
        self.possible_agents = list(AGENTS)
        self.agents = list(AGENTS)
        self.render_mode = None

    def observation_space(self, agent: str) -> Any:
        return self.core.observation_spaces[agent]

    def action_space(self, agent: str) -> Any:
        return self.core.action_spaces[agent]

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple:
        obs, infos = self.core.reset(seed=seed, options=options)
        self.agents = list(AGENTS)
        return obs, infos

    def step(self, actions: dict[str, Any]) -> tuple:
        obs, rewards, terminated, truncated, infos = self.core.step(actions)
        over = bool(terminated.pop("__all__")) | bool(truncated.pop("__all__"))
        self.agents = [] if over else [a for a in self.agents if not terminated.get(a, False)]
        return obs, rewards, terminated, truncated, infos
