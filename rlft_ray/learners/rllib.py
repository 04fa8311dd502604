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
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import (
    EvalOptions,
    Learner,
    LearnerContext,
    Spaces,
    TaskProbe,
    policy_eval_result,
)


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


def register_rllib_env() -> None:
    """Register :mod:`rlft_ray.rollout.rllib_env`'s creator as ``ENV_NAME`` with Tune's
    registry, which RLlib's env runners read. Call it once Ray is up: registering writes to
    Ray's key-value store when Ray looks initialised, and while the CLI's early start
    (:func:`~rlft_ray.run.ray_session.start_ray_early`) is half-way it made Ray auto-start
    a second instance ("Perhaps you called ray.init twice by accident?")."""
    from ray.tune.registry import register_env

    from rlft_ray.rollout import rllib_env

    register_env(rllib_env.ENV_NAME, rllib_env.make_env)


#: Settings RLlib tells apart by ``isinstance(value, tuple)`` (a YAML list becomes a tuple):
#: DQN's / SAC's ``n_step: [2, 5]`` is a range each sampled transition draws its n from.
TUPLE_SETTINGS: frozenset[str] = frozenset({"n_step"})


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

    The env comes from ``env`` / ``env.kwargs`` (by the name ``ENV_NAME``, which
    :func:`register_rllib_env` registers once Ray is up), the seed from
    ``seed``, ``num_envs_per_env_runner`` from ``env.num_envs_per_runner``; multi-agent
    envs get ``rllib.policies``; then ``rllib.config`` is applied and RLlib validates.

    Raises:
        ConfigError: An unknown ``rllib.config`` key (named), or what RLlib's
            ``validate`` refuses.
    """
    from ray.rllib.algorithms.registry import ALGORITHMS

    from rlft_ray.rollout import rllib_env

    require_rllib()
    name = cfg.rllib.algorithm
    # RLlib's own table of its algorithms: Tune's get_trainable_cls would look in Ray's
    # key-value store and so start a Ray instance of its own, before the run's init_ray
    algo_cls, _ = ALGORITHMS[name]()
    algo_config = algo_cls.get_default_config()
    _check_keys(algo_config, list(cfg.rllib.config), name)
    algo_config = (
        algo_config.environment(env=rllib_env.ENV_NAME, env_config=env_config(cfg))
        .env_runners(num_envs_per_env_runner=cfg.env.num_envs_per_runner)
        .debugging(seed=cfg.seed)
        .callbacks(rllib_env.EpisodeRecorder)
    )
    if env.multi_agent:
        shared = cfg.rllib.policies == "shared"
        algo_config = algo_config.multi_agent(
            policies={"shared"} if shared else set(env.agents),
            policy_mapping_fn=rllib_env.shared_policy if shared else rllib_env.own_policy,
        )
    try:
        for key, value in cfg.rllib.config.items():
            if key in TUPLE_SETTINGS and isinstance(value, list):
                value = tuple(value)
            setter = _setter(algo_config, key)
            if setter is not None:  # RLlib's own method for the setting (training, rl_module, ...)
                algo_config = setter(**{key: value})
            else:
                algo_config = algo_config.update_from_dict({key: value})
        algo_config.validate()
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError("rllib.config", f"RLlib's {name} config refuses it: {exc}") from None
    return algo_config


class RLModuleActor:
    """An RLlib RLModule behind the ``act(obs, deterministic)`` interface of our policies
    (what :func:`~rlft_ray.rollout.env_runner.evaluate_policy` calls).

    Args:
        module: The RLModule.
        action_space: The env's action space.
        normalized: RLlib's ``normalize_actions``: Box actions come out in ``[-1, 1]`` and
            are mapped onto the space's bounds.
    """

    def __init__(self, module: Any, action_space: gym.Space, normalized: bool) -> None:
        self.module, self.space, self.normalized = module, action_space, normalized

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = True) -> tuple[torch.Tensor, ...]:
        """``[B]`` / ``[B, A]`` actions (greedy or sampled); zeros for log-probs and values."""
        m = self.module
        out = (
            m.forward_inference({"obs": obs})
            if deterministic
            else m.forward_exploration({"obs": obs})
        )
        if "actions" in out:
            actions = out["actions"]
        else:
            dist_cls = (
                m.get_inference_action_dist_cls()
                if deterministic
                else m.get_exploration_action_dist_cls()
            )
            dist = dist_cls.from_logits(out["action_dist_inputs"])
            actions = (dist.to_deterministic() if deterministic else dist).sample()
        if isinstance(self.space, gym.spaces.Box) and self.normalized:
            low = torch.as_tensor(self.space.low, dtype=torch.float32)
            high = torch.as_tensor(self.space.high, dtype=torch.float32)
            actions = low + (actions.clamp(-1.0, 1.0) + 1.0) * (high - low) / 2.0
        zeros = torch.zeros(obs.shape[0])
        return actions, zeros, zeros


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
        raise ConfigError(
            "algo",
            "algo: rllib acts with RLlib's RLModule (checkpoint_*/rllib); start algo: ppo / "
            "dqn from it with init_from, or evaluate it with `rlft-ray eval`",
        )

    @classmethod
    def evaluate(cls, checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
        """``rlft-ray eval`` of a single-agent ``algo: rllib`` checkpoint: the module is built
        from the run's config and its weights read as data (no pickled code runs)."""

        from rlft_ray.learners.rllib_ckpt import read_rllib_module

        require_rllib()
        env = probe_env(cfg)
        if env.multi_agent:
            raise ConfigError("checkpoint", "rlft-ray eval runs single-agent policies")
        algo_config = build_algorithm_config(cfg, env)
        spec = algo_config.get_rl_module_spec(
            spaces={"default_policy": (env.observation, env.action)}, inference_only=False
        )
        module = spec.build()
        _, _, weights = read_rllib_module(checkpoint)
        missing = sorted(set(module.state_dict()) - set(weights))
        if missing:
            raise ConfigError("checkpoint", f"{checkpoint}: its module lacks {missing[:4]}")
        module.load_state_dict({k: torch.as_tensor(weights[k]) for k in module.state_dict()})
        module.eval()
        actor = RLModuleActor(module, env.action, bool(algo_config.normalize_actions))
        return policy_eval_result(actor, checkpoint, cfg, opts, rllib_algorithm=cfg.rllib.algorithm)

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
