"""Typed data that crosses the actor/learner boundary.

Arrays are numpy (cheap to ship through Ray's object store, zero-copy on read);
learners turn them into torch tensors. Shapes use T = rollout steps per env,
N = number of sub-environments (summed over runners after :meth:`RolloutBatch.concat`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


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


@dataclass
class GenerationBatch:
    """Completions sampled by generation actors, with their rewards.

    Shapes use B = prompts x ``group_size`` completions (the ``group_size`` completions
    of one prompt are contiguous rows), P = longest prompt, L = longest completion.

    Attributes:
        prompt_ids: ``[B, P]`` int64 prompt token ids, left-padded with ``pad_token_id``.
        prompt_mask: ``[B, P]`` bool, True on real prompt tokens.
        response_ids: ``[B, L]`` int64 completion token ids, right-padded.
        response_mask: ``[B, L]`` bool, True on real completion tokens (up to and
            including the EOS that stopped generation).
        logprobs: ``[B, L]`` float32 log-probs of each completion token under the
            sampling policy (temperature-scaled logits, full vocabulary); 0 on padding.
        rewards: ``[B]`` float32 scalar reward of each completion.
        group_ids: ``[B]`` int64; rows with the same id are completions of one prompt.
        prompts: ``B`` prompt texts (repeated per completion).
        completions: ``B`` decoded completions (special tokens removed).
        metadata: ``B`` per-prompt metadata dicts (``answer``, ...), repeated per completion.
        policy_version: Version of the weights that sampled the batch (oldest after concat).
        group_size: Completions per prompt.
        pad_token_id: Id used for padding.
        generate_s: Seconds the actors spent in ``generate`` (summed over actors).
        selection: What rejection sampling did (None: every sample was kept); the rows
            above are then the accepted samples only.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    rewards: np.ndarray
    group_ids: np.ndarray
    prompts: list[str]
    completions: list[str]
    metadata: list[dict]
    policy_version: int
    group_size: int
    pad_token_id: int
    generate_s: float = 0.0
    selection: SelectionStats | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_steps(self) -> int:
        """Completions generated (an LM run's "environment steps"), accepted or not."""
        return self.selection.num_generated if self.selection is not None else len(self)

    @property
    def num_tokens(self) -> int:
        """Tokens generated (real completion tokens only), accepted or not."""
        if self.selection is not None:
            return int(self.selection.lengths.sum())
        return int(self.response_mask.sum())

    @property
    def episodes(self) -> EpisodeStats:
        """Each generated completion is one episode whose return is its reward."""
        if self.selection is not None:
            rewards, lengths = self.selection.rewards, self.selection.lengths
        else:
            rewards, lengths = self.rewards, self.response_mask.sum(axis=1)
        return EpisodeStats(returns=[float(r) for r in rewards], lengths=[int(n) for n in lengths])

    def counts(self) -> dict[str, float]:
        """What this batch holds, for ``perf/{name}_per_s`` rates."""
        out = {
            "env_steps": float(self.num_steps),
            "samples": float(self.num_steps),
            "tokens": float(self.num_tokens),
        }
        if self.selection is not None:
            out["accepted"] = float(len(self))
        return out

    def take(self, rows: np.ndarray) -> GenerationBatch:
        """The batch restricted to ``rows`` (a ``[B]`` bool mask or index array).

        Padding columns that no kept row uses are not trimmed here (the learner trims).
        """
        idx = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows)
        keep = idx.tolist()
        return dataclasses.replace(
            self,
            prompt_ids=self.prompt_ids[idx],
            prompt_mask=self.prompt_mask[idx],
            response_ids=self.response_ids[idx],
            response_mask=self.response_mask[idx],
            logprobs=self.logprobs[idx],
            rewards=self.rewards[idx],
            group_ids=self.group_ids[idx],
            prompts=[self.prompts[i] for i in keep],
            completions=[self.completions[i] for i in keep],
            metadata=[self.metadata[i] for i in keep],
        )

    @staticmethod
    def concat(batches: Sequence[GenerationBatch]) -> GenerationBatch:
        """Join actors' batches: prompts re-padded on the left, completions on the right.

        Group ids are offset so groups stay distinct; ``policy_version`` is the oldest.
        """
        if len(batches) == 1:
            return batches[0]
        sizes = {b.group_size for b in batches}
        if len(sizes) != 1:
            raise ValueError(f"cannot concat generation batches with group sizes {sorted(sizes)}")
        pad = batches[0].pad_token_id
        p_len = max(b.prompt_ids.shape[1] for b in batches)
        r_len = max(b.response_ids.shape[1] for b in batches)

        def left(x: np.ndarray, value: float) -> np.ndarray:
            return np.pad(x, ((0, 0), (p_len - x.shape[1], 0)), constant_values=value)

        def right(x: np.ndarray, value: float) -> np.ndarray:
            return np.pad(x, ((0, 0), (0, r_len - x.shape[1])), constant_values=value)

        offsets = np.cumsum([0] + [int(b.group_ids.max()) + 1 if len(b) else 0 for b in batches])
        return GenerationBatch(
            prompt_ids=np.concatenate([left(b.prompt_ids, pad) for b in batches]),
            prompt_mask=np.concatenate([left(b.prompt_mask, False) for b in batches]),
            response_ids=np.concatenate([right(b.response_ids, pad) for b in batches]),
            response_mask=np.concatenate([right(b.response_mask, False) for b in batches]),
            logprobs=np.concatenate([right(b.logprobs, 0.0) for b in batches]),
            rewards=np.concatenate([b.rewards for b in batches]),
            group_ids=np.concatenate([b.group_ids + off for b, off in zip(batches, offsets)]),
            prompts=[p for b in batches for p in b.prompts],
            completions=[c for b in batches for c in b.completions],
            metadata=[m for b in batches for m in b.metadata],
            policy_version=min(b.policy_version for b in batches),
            group_size=batches[0].group_size,
            pad_token_id=pad,
            generate_s=sum(b.generate_s for b in batches),
            selection=_concat_selections(batches),
        )


def _concat_selections(batches: Sequence[GenerationBatch]) -> SelectionStats | None:
    stats = [b.selection for b in batches]
    if all(s is None for s in stats):
        return None
    if any(s is None for s in stats):
        raise ValueError("cannot concat selected and unselected generation batches")
    return SelectionStats.concat(stats)  # type: ignore[arg-type]


@dataclass
class Prompt:
    """One validated prompt, as the learner hands it to a generation actor.

    Attributes:
        text: The prompt as the model sees it (chat template applied, truncated if so
            configured); reward functions receive this text.
        ids: Its token ids (at most ``lm.max_prompt_tokens``).
        metadata: The data row's other columns (``answer``, ``ground_truth``, ...).
    """

    text: str
    ids: list[int]
    metadata: dict = field(default_factory=dict)
