"""``algo: rllib``: an RLlib algorithm described to the driver, and its ``AlgorithmConfig``.

RLlib's ``Algorithm`` samples and learns itself (its env runners and learners), so this
learner is not instantiated by the Ray Train loop: :attr:`RLlibLearner.runs_itself` sends
the driver to :func:`rlft_ray.run.rllib_run.run_rllib`, which steps the algorithm inside
the run directory. What this module does, before any Ray work: check RLlib is installed,
make the environment once (single- or multi-agent), and build the algorithm's config
from ``rllib.config``, refusing keys the algorithm does not have and running RLlib's own
``validate``. RLlib is imported only here, when ``algo: rllib`` runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
from torch import nn

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, TaskProbe


def require_rllib() -> None:
    """Fail naming ``algo`` when RLlib is not installed."""
    try:
        import ray.rllib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "algo", f"algo: rllib needs RLlib: pip install 'rlft-ray[rllib]' ({exc})"
        ) from None


@dataclass(frozen=True)
class EnvInfo:
    """The probed environment: spaces (per agent when multi-agent) and agent ids."""

    observation: gym.Space
    action: gym.Space
    agents: tuple[str, ...] = ()

    @property
    def multi_agent(self) -> bool:
        return bool(self.agents)


def env_config(cfg: RunConfig) -> dict[str, Any]:
    """What the env creator of :mod:`rlft_ray.rollout.rllib_env` receives."""
    return {
        "id": cfg.env.id,
        "kwargs": dict(cfg.env.kwargs),
        "max_episode_steps": cfg.env.max_episode_steps,
    }


def probe_env(cfg: RunConfig) -> EnvInfo:
    """Make the env once; its spaces (a Dict per agent id when multi-agent).

    Raises:
        ValueError: The env cannot be made (names ``env.id`` and ``env.kwargs``).
    """
    from rlft_ray.rollout.rllib_env import agent_ids, is_multi_agent, make_env

    try:
        env = make_env(env_config(cfg))
    except Exception as exc:  # gymnasium / user envs raise many types
        raise ValueError(
            f"env.id={cfg.env.id!r} with env.kwargs={cfg.env.kwargs} cannot be made: {exc}"
        ) from exc
    try:
        if is_multi_agent(env):
            agents = tuple(agent_ids(env))
            obs = gym.spaces.Dict({a: env.get_observation_space(a) for a in agents})
            act = gym.spaces.Dict({a: env.get_action_space(a) for a in agents})
            return EnvInfo(obs, act, agents)
        return EnvInfo(env.observation_space, env.action_space)
    finally:
        env.close()


def _check_keys(algo_config: Any, keys: list[str], name: str) -> None:
    """Every ``rllib.config`` key must be a setting of the algorithm's ``AlgorithmConfig``
    (an attribute it holds, or one of its properties)."""
    known = set(vars(algo_config)) | {
        k for k in dir(type(algo_config)) if isinstance(getattr(type(algo_config), k), property)
    }
    known = {k for k in known if not k.startswith("_")}
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean 'rllib.config.{near[0]}'?" if near else ""
            raise ConfigError(
                f"rllib.config.{key}",
                f"not a setting of RLlib's {type(algo_config).__name__} ({name}){hint}",
            )


#: ``AlgorithmConfig`` methods that set groups of settings, searched for a key's setter.
SETTER_METHODS: tuple[str, ...] = (
    "training",
    "rl_module",
    "env_runners",
    "learners",
    "evaluation",
    "reporting",
    "offline_data",
    "debugging",
    "fault_tolerance",
    "checkpointing",
    "resources",
)


def _setter(algo_config: Any, key: str) -> Any:
    """The method of ``algo_config`` that takes ``key`` as a keyword (None: set it directly)."""
    import inspect

    for name in SETTER_METHODS:
        method = getattr(algo_config, name, None)
        if method is not None and key in inspect.signature(method).parameters:
            return method
    return None


def build_algorithm_config(cfg: RunConfig, env: EnvInfo) -> Any:
    """The RLlib ``AlgorithmConfig`` of ``cfg`` (not built into an algorithm yet).

    The env comes from ``env`` / ``env.kwargs`` (registered as ``ENV_NAME``), the seed from
    ``seed``, ``num_envs_per_env_runner`` from ``env.num_envs_per_runner``; multi-agent
    envs get ``rllib.policies``; then ``rllib.config`` is applied and RLlib validates.

    Raises:
        ConfigError: An unknown ``rllib.config`` key (named), or what RLlib's
            ``validate`` refuses.
    """
    from ray.tune.registry import get_trainable_cls, register_env

    from rlft_ray.rollout import rllib_env

    require_rllib()
    name = cfg.rllib.algorithm
    algo_config = get_trainable_cls(name).get_default_config()
    _check_keys(algo_config, list(cfg.rllib.config), name)
    register_env(rllib_env.ENV_NAME, rllib_env.make_env)
    algo_config = (
        algo_config.environment(env=rllib_env.ENV_NAME, env_config=env_config(cfg))
        .env_runners(num_envs_per_env_runner=cfg.env.num_envs_per_runner)
        .debugging(seed=cfg.seed)
        .callbacks(rllib_env.EpisodeSuccess)
    )
    if env.multi_agent:
        shared = cfg.rllib.policies == "shared"
        algo_config = algo_config.multi_agent(
            policies={"shared"} if shared else set(env.agents),
            policy_mapping_fn=rllib_env.shared_policy if shared else rllib_env.own_policy,
        )
    try:
        for key, value in cfg.rllib.config.items():
            setter = _setter(algo_config, key)
            if setter is not None:  # RLlib's own method for the setting (training, rl_module, ...)
                algo_config = setter(**{key: value})
            else:
                algo_config = algo_config.update_from_dict({key: value})
        algo_config.validate()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError("rllib.config", f"RLlib's {name} config refuses it: {exc}") from None
    return algo_config


class RLlibLearner(Learner):
    """``algo: rllib`` for the driver: probes the env and checks the RLlib config; the
    training itself is RLlib's ``Algorithm`` (:mod:`rlft_ray.run.rllib_run`)."""

    runs_itself = True

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        require_rllib()
        env = probe_env(cfg)
        build_algorithm_config(cfg, env)  # unknown keys and RLlib's checks, before Ray
        info = {"rllib_algorithm": cfg.rllib.algorithm}
        if env.multi_agent:
            info["agents"] = list(env.agents)
        return TaskProbe(Spaces(env.observation, env.action), info=info)

    @classmethod
    def sampler(cls, cfg: RunConfig) -> type | None:
        return None  # RLlib's env runners sample

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        raise TypeError(
            "algo: rllib acts with RLlib's RLModule (checkpoint_*/rllib); export a gym "
            "policy with `rlft-ray export --format rllib`, or start algo: ppo / dqn from it "
            "with init_from"
        )

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        raise TypeError(
            "algo: rllib runs RLlib's Algorithm (rlft_ray.run.rllib_run), not a Learner"
        )

    def modules(self) -> dict[str, nn.Module]:  # pragma: no cover - never instantiated
        return {}

    def policy_state(self) -> dict[str, Any]:  # pragma: no cover - never instantiated
        return {}

    def update(self, batch: Any, progress: float) -> dict[str, float]:  # pragma: no cover
        return {}
