"""Typed data of the gymnasium side: rollout segments, whole episodes, and what a selection kept.

Arrays are numpy (cheap to ship through Ray's object store, zero-copy on read);
learners turn them into torch tensors. Shapes use T = rollout steps per env,
N = number of sub-environments (summed over runners after :meth:`RolloutBatch.concat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: The version a rollout actor holds before its first ``set_weights``: matches no policy
#: version, so a batch from an actor Ray restarted (and that came back with its
#: constructor's weights) is never taken for one sampled with the published ones.
UNSYNCED_VERSION = -1


@dataclass
class EpisodeStats:
    """Episodes that finished inside one rollout segment.

    Attributes:
        returns: Undiscounted return of each finished episode.
        lengths: Length in steps of each finished episode.
        successes: ``info["is_success"]`` at the episode's end, where the env sets it.
    """

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)

    @staticmethod
    def concat(stats: Sequence[EpisodeStats]) -> EpisodeStats:
        """Join the episodes of several runners."""
        return EpisodeStats(
            returns=[r for s in stats for r in s.returns],
            lengths=[n for s in stats for n in s.lengths],
            successes=[b for s in stats for b in s.successes],
        )


@dataclass
class RolloutBatch:
    """A time-major segment of vectorised environment interaction.

    Attributes:
        obs: ``[T, N, *obs_shape]`` float32 observation before each step.
        actions: ``[T, N, *act_shape]`` action taken (int64 discrete, float32 box).
        logprobs: ``[T, N]`` log pi(a|s) under the sampling policy (0 for DQN).
        values: ``[T, N]`` V(s) of the sampling policy (0 where there is no critic).
        rewards: ``[T, N]`` reward of each step.
        terminated: ``[T, N]`` bool, the MDP ended after this step.
        truncated: ``[T, N]`` bool, a time limit cut the episode after this step.
        next_obs: ``[T, N, *obs_shape]`` observation after each step; where the episode
            ended this is the final observation, not the reset one.
        bootstrap_values: ``[T, N]`` V(next_obs) where ``truncated`` (else 0), so the
            learner can bootstrap through time limits.
        last_values: ``[N]`` V(s_T) of the observation after the segment's last step.
        policy_version: Version of the weights that sampled this batch.
        episodes: Episodes that finished in this segment.
    """

    obs: np.ndarray
    actions: np.ndarray
    logprobs: np.ndarray
    values: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_obs: np.ndarray
    bootstrap_values: np.ndarray
    last_values: np.ndarray
    policy_version: int
    episodes: EpisodeStats = field(default_factory=EpisodeStats)

    @property
    def num_steps(self) -> int:
        """Environment steps in the batch (T * N)."""
        return int(self.rewards.shape[0] * self.rewards.shape[1])

    def counts(self) -> dict[str, float]:
        """What this batch holds, for ``perf/{name}_per_s`` rates."""
        return {"env_steps": float(self.num_steps)}

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Join runners' batches along the env axis N (all must share T).

        The result's ``policy_version`` is the oldest of the inputs, so staleness
        is never hidden.
        """
        if len(batches) == 1:
            return batches[0]
        lengths = {b.rewards.shape[0] for b in batches}
        if len(lengths) != 1:
            raise ValueError(
                f"cannot concat rollout segments of different lengths {sorted(lengths)}"
            )

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in batches], axis=1)

        return RolloutBatch(
            obs=cat("obs"),
            actions=cat("actions"),
            logprobs=cat("logprobs"),
            values=cat("values"),
            rewards=cat("rewards"),
            terminated=cat("terminated"),
            truncated=cat("truncated"),
            next_obs=cat("next_obs"),
            bootstrap_values=cat("bootstrap_values"),
            last_values=np.concatenate([b.last_values for b in batches], axis=0),
            policy_version=min(b.policy_version for b in batches),
            episodes=EpisodeStats.concat([b.episodes for b in batches]),
        )


@dataclass
class SelectionStats:
    """What a selection stage (rejection sampling) did to the samples of one batch.

    Only the accepted rows travel on in the batch; these are every generated sample's
    numbers, so rates and means over all of them stay available. N = samples generated.

    Attributes:
        rewards: ``[N]`` float32 reward of every generated sample.
        lengths: ``[N]`` int64 completion length (tokens) of every generated sample.
        accepted: ``[N]`` bool, which samples were kept.
        clipped: Samples whose acceptance ratio exceeded the bound M (ratio acceptance)
            or whose reward exceeded ``r_max`` (tilted acceptance), so their acceptance
            probability was clipped to 1.
        bound: The bound in use: log M (ratio acceptance) or r_max (tilted); None otherwise.
    """

    rewards: np.ndarray
    lengths: np.ndarray
    accepted: np.ndarray
    clipped: int = 0
    bound: float | None = None

    @property
    def num_generated(self) -> int:
        """Samples generated (accepted or not)."""
        return int(self.rewards.shape[0])

    @property
    def num_accepted(self) -> int:
        """Samples kept."""
        return int(self.accepted.sum())

    @staticmethod
    def concat(stats: Sequence[SelectionStats]) -> SelectionStats:
        """Join the selections of several actors (the bound is the largest in use)."""
        bounds = [s.bound for s in stats if s.bound is not None]
        return SelectionStats(
            rewards=np.concatenate([s.rewards for s in stats]),
            lengths=np.concatenate([s.lengths for s in stats]),
            accepted=np.concatenate([s.accepted for s in stats]),
            clipped=sum(s.clipped for s in stats),
            bound=max(bounds) if bounds else None,
        )


@dataclass
class EpisodeBatch:
    """Whole episodes an env runner kept after selecting them by return (filtered BC).

    S = steps of the kept episodes, E = episodes that finished (kept or not).

    Attributes:
        obs: ``[S, *obs_shape]`` float32 observation before each kept step.
        actions: ``[S, *act_shape]`` the action taken (int64 discrete, float32 box).
        selection: Every finished episode's return (``rewards``) and length, and which
            were kept (``accepted``), ``[E]`` each.
        env_steps: Environment steps taken to collect them (all sub-envs).
        policy_version: Version of the weights at the end of collection (the oldest
            after :meth:`concat`).
        episodes: Every finished episode's statistics (successes included).
    """

    obs: np.ndarray
    actions: np.ndarray
    selection: SelectionStats
    env_steps: int
    policy_version: int
    episodes: EpisodeStats = field(default_factory=EpisodeStats)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def num_steps(self) -> int:
        """Environment steps taken (kept or not)."""
        return self.env_steps

    def counts(self) -> dict[str, float]:
        """What this batch holds, for ``perf/{name}_per_s`` rates."""
        return {"env_steps": float(self.env_steps), "accepted_steps": float(len(self))}

    @staticmethod
    def concat(batches: Sequence[EpisodeBatch]) -> EpisodeBatch:
        """Join several runners' kept episodes."""
        if len(batches) == 1:
            return batches[0]
        return EpisodeBatch(
            obs=np.concatenate([b.obs for b in batches]),
            actions=np.concatenate([b.actions for b in batches]),
            selection=SelectionStats.concat([b.selection for b in batches]),
            env_steps=sum(b.env_steps for b in batches),
            policy_version=min(b.policy_version for b in batches),
            episodes=EpisodeStats.concat([b.episodes for b in batches]),
        )
