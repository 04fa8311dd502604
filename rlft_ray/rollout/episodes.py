"""Whole episodes from an env runner, selected by return on the actor (filtered BC).

:class:`EpisodeCollector` is an :class:`~rlft_ray.rollout.env_runner.EnvRunner` that
stitches its time-major segments into complete episodes (an episode still running
when a call ends carries over to the next call), keeps the top fraction of the
finished ones by return, and ships only their steps: the same selection stage as
the generation actors' rejection sampling, on the gym side. A continuous (``Box``)
action is shipped as the env executed it, clipped to the bounds, not as the raw
Gaussian sample: behaviour cloning imitates what was done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms.selection import quantile_mask
from rlft_ray.config import EnvConfig
from rlft_ray.rewards import RewardError
from rlft_ray.rollout.env_runner import EnvRunner
from rlft_ray.types import EpisodeBatch, EpisodeStats, RolloutBatch, SelectionStats


@dataclass
class _Part:
    """Some consecutive steps of one sub-env."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray


@dataclass
class _Episode:
    obs: np.ndarray
    actions: np.ndarray
    ret: float
    success: bool | None


class EpisodeCollector(EnvRunner):
    """Collects ``episodes_per_sample`` complete episodes per call and keeps the best.

    Args:
        env_cfg, make_policy, rollout_steps, seed, num_threads: As for :class:`EnvRunner`
            (``rollout_steps`` is the segment length between episode checks).
        episodes_per_sample: Finished episodes to collect per :meth:`sample` (at least).
        top_fraction: Fraction kept by return (at least one episode).
        min_return: Also drop kept episodes below this return; None: no floor.
    """

    def __init__(
        self,
        env_cfg: EnvConfig,
        make_policy: Callable[[gym.Space, gym.Space], nn.Module],
        rollout_steps: int,
        seed: int,
        num_threads: int = 1,
        episodes_per_sample: int = 16,
        top_fraction: float = 0.25,
        min_return: float | None = None,
    ) -> None:
        super().__init__(env_cfg, make_policy, rollout_steps, seed, num_threads)
        self.episodes_per_sample = episodes_per_sample
        self.top_fraction = top_fraction
        self.min_return = min_return
        self.generator = torch.Generator().manual_seed(seed)
        # The running episode of each sub-env: its observations, actions and rewards so far.
        self._open: list[list[_Part]] = [[] for _ in range(self.num_envs)]

    def sample(self, num_steps: int | None = None) -> EpisodeBatch:  # type: ignore[override]
        """Play until ``episodes_per_sample`` episodes finished; keep the top fraction."""
        finished: list[_Episode] = []
        env_steps = 0
        while len(finished) < self.episodes_per_sample:
            segment = self._executed(super().sample(num_steps))
            env_steps += segment.num_steps
            finished.extend(self._stitch(segment))
        returns = np.array([e.ret for e in finished], dtype=np.float32)
        _check_finite_returns(returns, self.env_cfg.id)
        keep = quantile_mask(
            torch.as_tensor(returns, dtype=torch.float64), self.top_fraction, None, self.generator
        ).numpy()
        if self.min_return is not None:
            keep &= returns >= self.min_return
        kept = [e for e, k in zip(finished, keep) if k]
        obs_shape = self.env.single_observation_space.shape
        act_shape = self.env.single_action_space.shape
        return EpisodeBatch(
            obs=np.concatenate([e.obs for e in kept]) if kept else np.zeros((0, *obs_shape)),
            actions=np.concatenate([e.actions for e in kept])
            if kept
            else np.zeros((0, *act_shape)),
            selection=SelectionStats(
                rewards=returns,
                lengths=np.array([len(e.obs) for e in finished], dtype=np.int64),
                accepted=keep,
            ),
            env_steps=env_steps,
            policy_version=self.policy_version,
            episodes=EpisodeStats(
                returns=[e.ret for e in finished],
                lengths=[len(e.obs) for e in finished],
                successes=[e.success for e in finished if e.success is not None],
            ),
        )

    def _executed(self, seg: RolloutBatch) -> RolloutBatch:
        """The segment with the actions the env executed: Gaussian samples clipped to the
        ``Box`` bounds as :meth:`EnvRunner.sample` clipped them for the env (PPO keeps the
        raw samples, whose log-probs it needs; imitation wants the executed action)."""
        space = self.env.single_action_space
        if not isinstance(space, gym.spaces.Box):
            return seg
        clipped = np.clip(seg.actions, space.low, space.high).astype(seg.actions.dtype)
        return dataclasses.replace(seg, actions=clipped)

    def _stitch(self, seg: RolloutBatch) -> list[_Episode]:
        """Append the segment to each sub-env's running episode; return those that ended."""
        done = seg.terminated | seg.truncated  # [T, N]
        successes = iter(seg.episodes.successes)
        has_success = len(seg.episodes.successes) == len(seg.episodes.returns)
        ended: list[_Episode] = []
        # Episodes end in time order across sub-envs in seg.episodes; match that order.
        ends = sorted((t, n) for t, n in zip(*np.nonzero(done)))
        by_env: dict[int, list[int]] = {}
        for t, n in ends:
            by_env.setdefault(int(n), []).append(int(t))
        closed: dict[tuple[int, int], _Episode] = {}
        for n in range(self.num_envs):
            start = 0
            for t in by_env.get(n, []):
                closed[(t, n)] = self._close(n, seg, start, t + 1)
                start = t + 1
            if start < seg.rewards.shape[0]:
                self._open[n].append(_slice(seg, n, start, seg.rewards.shape[0]))
        for key in ends:
            episode = closed[key]
            episode.success = next(successes) if has_success else None
            ended.append(episode)
        return ended

    def _close(self, n: int, seg: RolloutBatch, start: int, stop: int) -> _Episode:
        parts = [*self._open[n], _slice(seg, n, start, stop)]
        self._open[n] = []
        return _Episode(
            obs=np.concatenate([p.obs for p in parts]),
            actions=np.concatenate([p.actions for p in parts]),
            ret=float(sum(p.rewards.sum() for p in parts)),
            success=None,
        )


def _check_finite_returns(returns: np.ndarray, env_id: str) -> None:
    """Refuse an episode whose return is not finite: it cannot be ranked for selection.

    Raises:
        RewardError: Names the first such episode (in finishing order) and the env.
    """
    bad = np.flatnonzero(~np.isfinite(returns))
    if len(bad):
        i = int(bad[0])
        raise RewardError(
            f"episode {i} of {len(returns)} collected from {env_id} has return {returns[i]}: "
            "filtered BC ranks episodes by return and cannot rank a non-finite one"
        )


def _slice(seg: RolloutBatch, n: int, start: int, stop: int) -> _Part:
    """Steps ``start:stop`` of sub-env ``n``."""
    return _Part(seg.obs[start:stop, n], seg.actions[start:stop, n], seg.rewards[start:stop, n])
