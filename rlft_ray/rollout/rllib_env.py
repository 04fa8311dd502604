"""Environments as RLlib sees them: gymnasium ids, RLlib ``MultiAgentEnv``s and PettingZoo envs.

``env.id`` is either a registered gymnasium id (``CartPole-v1``, ``rlft/Navigation-v0``)
or an entry point ``module:attr`` whose attribute (a class or factory) is called with
``env.kwargs``: a gymnasium ``Env``, an RLlib ``MultiAgentEnv``, or a PettingZoo env
(parallel or AEC), which RLlib's PettingZoo wrappers turn into a ``MultiAgentEnv``.
Importing this module imports RLlib: only ``algo: rllib`` runs do.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import gymnasium as gym
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.env.multi_agent_env import MultiAgentEnv

#: The name the run's env creator is registered under with Ray Tune's registry.
ENV_NAME = "rlft_ray_env"
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def make_env(env_config: dict[str, Any]) -> Any:
    """The env of ``{"id", "kwargs", "max_episode_steps"}`` (what RLlib's env runners call).

    Returns:
        A gymnasium ``Env`` or an RLlib ``MultiAgentEnv`` (PettingZoo envs wrapped).
    """
    import envs  # noqa: F401  (registers rlft/* ids)

    env_id, kwargs = env_config["id"], dict(env_config.get("kwargs") or {})
    max_steps = env_config.get("max_episode_steps")
    if not _ENTRY_POINT.match(env_id):
        if max_steps is not None:
            kwargs["max_episode_steps"] = max_steps
        return gym.make(env_id, **kwargs)
    module, attr = env_id.split(":")
    env = getattr(importlib.import_module(module), attr)(**kwargs)
    env = _wrap_pettingzoo(env)
    if isinstance(env, gym.Env) and max_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_steps)
    return env


def _wrap_pettingzoo(env: Any) -> Any:
    """A PettingZoo env as RLlib's ``MultiAgentEnv`` (other envs unchanged)."""
    try:
        from pettingzoo import AECEnv, ParallelEnv
    except ImportError:  # no PettingZoo installed: no PettingZoo env either
        return env
    if isinstance(env, ParallelEnv):
        from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

        return ParallelPettingZooEnv(env)
    if isinstance(env, AECEnv):
        from ray.rllib.env.wrappers.pettingzoo_env import PettingZooEnv

        return PettingZooEnv(env)
    return env


def is_multi_agent(env: Any) -> bool:
    """Whether ``env`` is an RLlib multi-agent env."""
    return isinstance(env, MultiAgentEnv)


def agent_ids(env: MultiAgentEnv) -> list[str]:
    """A multi-agent env's agents (``possible_agents``, else ``agents``), as sorted strings."""
    agents = list(getattr(env, "possible_agents", None) or getattr(env, "agents", []))
    return sorted(str(a) for a in agents)


def shared_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Policy mapping of ``rllib.policies: shared``: every agent acts with one module."""
    return "shared"


def own_policy(agent_id: Any, episode: Any = None, **kwargs: Any) -> str:
    """Policy mapping of ``rllib.policies: per_agent``: each agent has its own module."""
    return str(agent_id)


#: Where :class:`EpisodeRecorder` logs each finished episode's return and success: RLlib
#: reports them as this iteration's lists (``result["env_runners"][key]``).
RETURNS_KEY = "rlft_episode_returns"
SUCCESSES_KEY = "rlft_episode_successes"


class EpisodeRecorder(RLlibCallback):
    """Logs every finished episode's return (all agents' rewards summed) and, where the env
    reports ``info["is_success"]`` on the final step, its success (a multi-agent episode
    succeeds when every agent reports it), so the driver keeps rlft-ray's window of the
    last 20 episodes. RLlib's own ``episode_return_mean`` averages only the episodes that
    finished in the iteration.

    An env runner hands RLlib's callback only the episode's last *chunk* (the steps since its
    previous ``sample()`` call; with SAC's 5-step fragments, at most 5 of Pendulum's 200) and
    the chunks before it as ``prev_episode_chunks``: the return is the sum over all of them,
    as RLlib's own episode metrics compute it."""

    def on_episode_end(
        self,
        *,
        episode: Any,
        metrics_logger: Any = None,
        prev_episode_chunks: Any = None,
        **kwargs: Any,
    ) -> None:
        if metrics_logger is None:
            return
        metrics_logger.log_value(
            RETURNS_KEY,
            episode_return(episode, prev_episode_chunks),
            reduce="item_series",
            window=10_000,
        )
        success = episode_success(episode)
        if success is not None:
            metrics_logger.log_value(
                SUCCESSES_KEY, float(success), reduce="item_series", window=10_000
            )


def episode_return(episode: Any, prev_chunks: Any = None) -> float:
    """A finished episode's return (all agents' rewards summed): its last chunk's plus those
    of the chunks an env runner cut it into before."""
    return float(episode.get_return()) + sum(float(c.get_return()) for c in prev_chunks or ())


def episode_success(episode: Any) -> bool | None:
    """``info["is_success"]`` of an episode's last step (all agents'); None if not reported."""
    if hasattr(episode, "agent_episodes"):  # multi-agent: each agent's own last info
        flags = []
        for single in episode.agent_episodes.values():
            info = single.get_infos(-1) if len(single.infos) else {}
            if isinstance(info, dict) and "is_success" in info:
                flags.append(bool(info["is_success"]))
        return all(flags) if flags else None
    info = episode.get_infos(-1)
    if isinstance(info, dict) and "is_success" in info:
        return bool(info["is_success"])
    return None
