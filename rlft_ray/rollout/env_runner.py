"""Env runners: step a gymnasium vector env with the current policy.

:class:`EnvRunner` is a plain class (tests use it without Ray); the driver wraps
it with ``ray.remote`` (see :func:`rlft_ray.rollout.group.make_remote_runners`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlft_ray.config import EnvConfig
from rlft_ray.core.torch_utils import hold_threads
from rlft_ray.rollout.shared_weights import SharedSlot, received_weights
from rlft_ray.rollout.weight_timing import TimedWeightLoads
from rlft_ray.types import UNSYNCED_VERSION, EpisodeStats, RolloutBatch

#: Longest evaluation episode of an env that sets no ``max_episode_steps``.
MAX_EVAL_EPISODE_STEPS = 100_000


def make_env(env_cfg: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """``gymnasium.make`` for a config, importing the project's ``envs`` first."""
    import envs  # noqa: F401  (registers rlft/* ids)

    kwargs: dict[str, Any] = dict(env_cfg.kwargs)
    if env_cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = env_cfg.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    return gym.make(env_cfg.id, **kwargs)


def probe_spaces(env_cfg: EnvConfig) -> tuple[gym.Space, gym.Space]:
    """Make the env once to read its spaces; bad ids and kwargs fail here, before Ray."""
    try:
        env = make_env(env_cfg)
    except Exception as exc:  # gymnasium raises several types; name the cause for the user
        raise ValueError(
            f"env.id={env_cfg.id!r} with env.kwargs={env_cfg.kwargs} cannot be made: {exc}"
        ) from exc
    spaces = (env.observation_space, env.action_space)
    env.close()
    return spaces


class EnvRunner(TimedWeightLoads):
    """Steps ``num_envs`` copies of an env with the latest published policy.

    Args:
        env_cfg: Which environment, how many sub-envs.
        make_policy: Builds the policy module from ``(obs_space, action_space)``;
            must be picklable (a module-level function or ``functools.partial``).
        rollout_steps: T, steps per sub-env in each :meth:`sample`.
        seed: Base seed; sub-env i of this runner resets with ``seed + i``.
        num_threads: torch threads (the CPUs this runner holds).
    """

    def __init__(
        self,
        env_cfg: EnvConfig,
        make_policy: Callable[[gym.Space, gym.Space], nn.Module],
        rollout_steps: int,
        seed: int,
        num_threads: int = 1,
    ) -> None:
        hold_threads(num_threads)
        torch.manual_seed(seed)
        self.env = gym.vector.SyncVectorEnv(
            [lambda: make_env(env_cfg) for _ in range(env_cfg.num_envs_per_runner)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        )
        self.env_cfg = env_cfg
        self.num_envs = env_cfg.num_envs_per_runner
        self.rollout_steps = rollout_steps
        self.policy = make_policy(self.env.single_observation_space, self.env.single_action_space)
        self.policy.eval()
        self.policy_version = UNSYNCED_VERSION  # until the learner publishes
        self.obs, _ = self.env.reset(seed=seed)
        self.ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self.ep_len = np.zeros(self.num_envs, dtype=np.int64)

    def set_weights(self, weights: dict[str, Any] | SharedSlot, version: int) -> int:
        """Load published policy weights (tensors, numpy arrays or a shared-memory
        :class:`~rlft_ray.rollout.shared_weights.SharedSlot`); returns the version now held."""
        self.policy.load_state_dict(received_weights(weights))
        self.policy_version = version
        return version

    def get_version(self) -> int:
        """The policy version this runner samples with."""
        return self.policy_version

    def sample(self, num_steps: int | None = None) -> RolloutBatch:
        """Collect ``num_steps`` (default ``rollout_steps``) steps from every sub-env."""
        T, N = num_steps or self.rollout_steps, self.num_envs
        obs_buf = np.zeros((T, N, *self.obs.shape[1:]), dtype=np.float32)
        next_obs_buf = np.zeros_like(obs_buf)
        act_shape = self.env.single_action_space.shape
        act_dtype = (
            np.int64
            if isinstance(self.env.single_action_space, gym.spaces.Discrete)
            else np.float32
        )
        actions_buf = np.zeros((T, N, *act_shape), dtype=act_dtype)
        logp_buf, val_buf, rew_buf, boot_buf = (
            np.zeros((T, N), dtype=np.float32) for _ in range(4)
        )
        term_buf, trunc_buf = np.zeros((T, N), dtype=bool), np.zeros((T, N), dtype=bool)
        episodes = EpisodeStats()

        for t in range(T):
            obs_t = torch.as_tensor(self.obs, dtype=torch.float32)
            actions, logp, values = self.policy.act(obs_t)
            env_actions = actions.numpy()
            if (
                act_dtype == np.float32
            ):  # Gaussian samples are unbounded; the env sees a legal action
                space = self.env.single_action_space
                env_actions = np.clip(env_actions, space.low, space.high)
            next_obs, rewards, terminated, truncated, infos = self.env.step(env_actions)

            obs_buf[t] = self.obs
            actions_buf[t] = actions.numpy()
            logp_buf[t], val_buf[t] = logp.numpy(), values.numpy()
            rew_buf[t], term_buf[t], trunc_buf[t] = rewards, terminated, truncated
            real_next = np.array(next_obs, dtype=np.float32, copy=True)
            done = terminated | truncated
            if done.any():
                # SAME_STEP autoreset: next_obs already holds the reset obs; the true
                # final obs is in infos["final_obs"].
                for i in np.flatnonzero(done):
                    real_next[i] = infos["final_obs"][i]
                if truncated.any():
                    idx = np.flatnonzero(truncated & ~terminated)
                    if idx.size:
                        boot_buf[t, idx] = self.policy.value(
                            torch.as_tensor(real_next[idx])
                        ).numpy()
            next_obs_buf[t] = real_next

            self.ep_return += rewards
            self.ep_len += 1
            for i in np.flatnonzero(done):
                episodes.returns.append(float(self.ep_return[i]))
                episodes.lengths.append(int(self.ep_len[i]))
                final_info = infos.get("final_info", {})
                if "is_success" in final_info:
                    episodes.successes.append(bool(final_info["is_success"][i]))
                self.ep_return[i], self.ep_len[i] = 0.0, 0
            self.obs = next_obs

        last_values = self.policy.value(torch.as_tensor(self.obs, dtype=torch.float32)).numpy()
        return RolloutBatch(
            obs=obs_buf,
            actions=actions_buf,
            logprobs=logp_buf,
            values=val_buf,
            rewards=rew_buf,
            terminated=term_buf,
            truncated=trunc_buf,
            next_obs=next_obs_buf,
            bootstrap_values=boot_buf,
            last_values=last_values.astype(np.float32),
            policy_version=self.policy_version,
            episodes=episodes,
        )

    def heldout_scores(self, episodes: int, seed: int) -> tuple[int, EpisodeStats]:
        """``episodes`` greedy episodes of the policy this runner holds, on a separate env
        seeded ``seed + i`` (held-out seeds: training resets never use them), and the
        policy version they are of."""
        stats = evaluate_policy(self.policy, self.env_cfg, episodes, seed, deterministic=True)
        return self.policy_version, stats

    def close(self) -> None:
        """Close the vector env."""
        self.env.close()


def evaluate_policy(
    policy: nn.Module, env_cfg: EnvConfig, episodes: int, seed: int, deterministic: bool = True
) -> EpisodeStats:
    """Run ``episodes`` full episodes with ``policy`` on one env (no Ray needed).

    Args:
        policy: Anything with ``act(obs, deterministic)``.
        env_cfg: Environment to evaluate on.
        episodes: Number of episodes.
        seed: Episode i resets with ``seed + i``.
        deterministic: Greedy/mean actions instead of sampling.

    Returns:
        Returns, lengths and (where the env reports it) successes.
    """
    env = make_env(env_cfg)
    stats = EpisodeStats()
    space = env.action_space
    # an env without a time limit would never end an episode that balances forever
    limit = getattr(env.spec, "max_episode_steps", None) or MAX_EVAL_EPISODE_STEPS
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, length, done, info = 0.0, 0, False, {}
        while not done and length < limit:
            action, _, _ = policy.act(
                torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0), deterministic
            )
            a = action[0].numpy()
            if isinstance(space, gym.spaces.Box):
                a = np.clip(a, space.low, space.high)
            else:
                a = int(a)
            obs, reward, terminated, truncated, info = env.step(a)
            total += float(reward)
            length += 1
            done = terminated or truncated
        stats.returns.append(total)
        stats.lengths.append(length)
        if "is_success" in info:
            stats.successes.append(bool(info["is_success"]))
    env.close()
    return stats
