"""Typed data of the language-model side: prompts, sampled completions, preference pairs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rlft_ray.types.agents import AgentStats
from rlft_ray.types.episodes import EpisodeStats, SelectionStats


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists as one padded array: prompts go ``left`` (generation continues from
    the last column), completions ``right``.

    Args:
        seqs: N token id sequences of any lengths.
        pad_id: Id written on padding.
        side: ``"left"`` or ``"right"``.
        width: Columns (default: the longest sequence, at least 1).

    Returns:
        ``ids`` ``[N, width]`` int64 and ``mask`` ``[N, width]`` bool (True on real tokens).
    """
    width = max((len(s) for s in seqs), default=1) if width is None else width
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, True
    return ids, mask


def _pad_cols(x: np.ndarray, width: int, value: float, side: str) -> np.ndarray:
    """``x`` ``[N, w]`` padded with ``value`` to ``[N, width]`` on ``side``."""
    extra = width - x.shape[1]
    return np.pad(x, ((0, 0), (extra, 0) if side == "left" else (0, extra)), constant_values=value)


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
        prompt_templated: ``[B]`` bool, whether each prompt text came through the chat
            template (:attr:`Prompt.templated`); None: no prompt did.
        policy_version: Version of the weights that sampled the batch (oldest after concat).
        group_size: Completions per prompt.
        pad_token_id: Id used for padding.
        generate_s: Seconds the actors spent in ``generate`` (summed over actors).
        peak_rss_mb: Peak resident memory of each actor process that sampled the batch, MB.
        selection: What rejection sampling or dynamic sampling did (None: every sample
            was kept); the rows above are then the accepted samples only.
        filtered_groups: Groups dynamic sampling dropped for all-equal rewards.
        extra_samples: Completions dynamic sampling generated beyond the first round.
        resample_rounds: Extra sampling rounds dynamic sampling took.
        loss_mask: ``[B, L]`` bool, the tokens the loss covers: a multi-turn episode's
            response holds the model's turns and the environment's replies between them,
            and only the model's tokens are trained on (None: every real token,
            ``response_mask``, which then only marks what is attended to).
        step_rewards: ``[B, L]`` float32, each turn's reward on its last model token
            (multi-turn; their row sum is ``rewards``); None: single-turn.
        agent: What the multi-turn episodes did (turns, tool calls, failures); None:
            single-turn completions.
        reward_timeouts: Reward-function calls that passed ``lm.reward_timeout_s`` (their
            samples were scored 0).
        unfinished: ``[B]`` bool, the rows of one multi-turn call whose turn was parked
            before its EOS or cap, to go on in the next call
            (:class:`~rlft_ray.rollout.turn_cache.TurnStops`); None: every row ended.
            Only between a turn's call and :func:`~rlft_ray.rollout.multiturn.run_episodes`
            (``concat`` of several batches drops it).
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
    peak_rss_mb: tuple[float, ...] = ()
    selection: SelectionStats | None = None
    prompt_templated: np.ndarray | None = None
    filtered_groups: int = 0
    extra_samples: int = 0
    resample_rounds: int = 0
    loss_mask: np.ndarray | None = None
    step_rewards: np.ndarray | None = None
    agent: AgentStats | None = None
    reward_timeouts: int = 0
    unfinished: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_steps(self) -> int:
        """Completions generated (an LM run's "environment steps"), accepted or not."""
        return self.selection.num_generated if self.selection is not None else len(self)

    @property
    def num_tokens(self) -> int:
        """Tokens generated (real completion tokens only; multi-turn: the model's
        tokens, not the environment's), accepted or not."""
        if self.selection is not None:
            return int(self.selection.lengths.sum())
        return int(self.train_mask.sum())

    @property
    def train_mask(self) -> np.ndarray:
        """``[B, L]`` bool: the tokens the loss covers (``loss_mask``, else ``response_mask``)."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    @property
    def episodes(self) -> EpisodeStats:
        """Each generated completion is one episode whose return is its reward (a
        multi-turn episode's: its summed turn rewards, its length in turns)."""
        if self.agent is not None:
            a = self.agent
            return EpisodeStats(
                returns=[float(r) for r in a.returns],
                lengths=[int(n) for n in a.turns],
                successes=[bool(s) for s in a.success],
            )
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
            prompt_templated=None if self.prompt_templated is None else self.prompt_templated[idx],
            loss_mask=None if self.loss_mask is None else self.loss_mask[idx],
            step_rewards=None if self.step_rewards is None else self.step_rewards[idx],
            unfinished=None if self.unfinished is None else self.unfinished[idx],
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
            return _pad_cols(x, p_len, value, "left")

        def right(x: np.ndarray, value: float) -> np.ndarray:
            return _pad_cols(x, r_len, value, "right")

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
            peak_rss_mb=tuple(m for b in batches for m in b.peak_rss_mb),
            selection=_concat_selections(batches),
            prompt_templated=_concat_templated(batches),
            filtered_groups=sum(b.filtered_groups for b in batches),
            extra_samples=sum(b.extra_samples for b in batches),
            resample_rounds=max(b.resample_rounds for b in batches),
            loss_mask=_concat_optional(batches, "loss_mask", right, False),
            step_rewards=_concat_optional(batches, "step_rewards", right, 0.0),
            agent=_concat_agents(batches),
            reward_timeouts=sum(b.reward_timeouts for b in batches),
        )


def _concat_optional(
    batches: Sequence[GenerationBatch],
    name: str,
    pad: Callable[[np.ndarray, float], np.ndarray],
    value: float,
) -> np.ndarray | None:
    """The ``[B, L]`` array ``name`` joined (None where every batch has none; a batch
    without it counts its ``response_mask`` as the loss mask, or zero step rewards)."""
    if all(getattr(b, name) is None for b in batches):
        return None
    parts = []
    for b in batches:
        x = getattr(b, name)
        if x is None:
            x = (
                b.response_mask
                if name == "loss_mask"
                else np.zeros(b.response_mask.shape, np.float32)
            )
        parts.append(pad(x, value))
    return np.concatenate(parts)


def _concat_agents(batches: Sequence[GenerationBatch]) -> AgentStats | None:
    stats = [b.agent for b in batches if b.agent is not None]
    return AgentStats.concat(stats) if stats else None


def _concat_templated(batches: Sequence[GenerationBatch]) -> np.ndarray | None:
    """The batches' ``prompt_templated`` flags joined (None where no batch has any)."""
    if all(b.prompt_templated is None for b in batches):
        return None
    return np.concatenate(
        [
            np.zeros(len(b), dtype=bool) if b.prompt_templated is None else b.prompt_templated
            for b in batches
        ]
    )


def _concat_selections(batches: Sequence[GenerationBatch]) -> SelectionStats | None:
    stats = [b.selection for b in batches]
    if all(s is None for s in stats):
        return None
    if any(s is None for s in stats):
        raise ValueError("cannot concat selected and unselected generation batches")
    return SelectionStats.concat(stats)  # type: ignore[arg-type]


@dataclass
class PairBatch:
    """Preference pairs as a learner consumes them (DPO, reward models).

    Shapes use B = pairs, P = longest prompt, L = longest completion (chosen or rejected).

    Attributes:
        prompt_ids: ``[B, P]`` int64 prompt token ids, left-padded with ``pad_token_id``.
        prompt_mask: ``[B, P]`` bool, True on real prompt tokens.
        chosen_ids: ``[B, L]`` int64 preferred completion, right-padded (EOS included).
        chosen_mask: ``[B, L]`` bool, True on its real tokens.
        rejected_ids: ``[B, L]`` int64 dispreferred completion, right-padded.
        rejected_mask: ``[B, L]`` bool.
        ref_chosen: ``[B]`` float32 log pi_ref(chosen | prompt) summed over its tokens, when
            precomputed (None: the learner computes it).
        ref_rejected: ``[B]`` float32 likewise for the rejected completion.
        pad_token_id: Id used for padding.
        policy_version: Version of the policy the pairs were sampled with (online DPO), or
            the learner's current version (offline pairs).
        skipped_groups: Prompts that formed no pair (online DPO: all samples scored alike).
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    pad_token_id: int
    policy_version: int = 0
    ref_chosen: np.ndarray | None = None
    ref_rejected: np.ndarray | None = None
    skipped_groups: int = 0

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def num_steps(self) -> int:
        """Pairs in the batch (a preference run's "environment steps")."""
        return len(self)

    @property
    def episodes(self) -> EpisodeStats:
        """Pairs are no episodes."""
        return EpisodeStats()

    def counts(self) -> dict[str, float]:
        """What this batch holds, for ``perf/{name}_per_s`` rates (a pair is an "env step")."""
        return {"env_steps": float(len(self)), "pairs": float(len(self))}

    @staticmethod
    def concat(batches: Sequence[PairBatch]) -> PairBatch:
        """Join batches (one per source); re-pads prompts left and completions right."""
        if len(batches) == 1:
            return batches[0]
        pad = batches[0].pad_token_id
        p_len = max(b.prompt_ids.shape[1] for b in batches)
        r_len = max(max(b.chosen_ids.shape[1], b.rejected_ids.shape[1]) for b in batches)

        def left(x: np.ndarray, value: float) -> np.ndarray:
            return _pad_cols(x, p_len, value, "left")

        def right(x: np.ndarray, value: float) -> np.ndarray:
            return _pad_cols(x, r_len, value, "right")

        refs = all(b.ref_chosen is not None for b in batches)
        return PairBatch(
            prompt_ids=np.concatenate([left(b.prompt_ids, pad) for b in batches]),
            prompt_mask=np.concatenate([left(b.prompt_mask, False) for b in batches]),
            chosen_ids=np.concatenate([right(b.chosen_ids, pad) for b in batches]),
            chosen_mask=np.concatenate([right(b.chosen_mask, False) for b in batches]),
            rejected_ids=np.concatenate([right(b.rejected_ids, pad) for b in batches]),
            rejected_mask=np.concatenate([right(b.rejected_mask, False) for b in batches]),
            pad_token_id=pad,
            policy_version=min(b.policy_version for b in batches),
            ref_chosen=np.concatenate([b.ref_chosen for b in batches]) if refs else None,
            ref_rejected=np.concatenate([b.ref_rejected for b in batches]) if refs else None,
            skipped_groups=sum(b.skipped_groups for b in batches),
        )


@dataclass
class Prompt:
    """One validated prompt, as the learner hands it to a generation actor.

    Attributes:
        text: The prompt as the model sees it (chat template applied, truncated if so
            configured); reward functions receive this text.
        ids: Its token ids (at most ``lm.max_prompt_tokens``).
        metadata: The data row's other columns (``answer``, ``ground_truth``, ...).
        templated: Whether ``text`` came through the chat template (encoded without the
            tokenizer's special tokens: the template wrote them), as conversational
            prompts always do; a reward-model scorer encodes the text the same way.
    """

    text: str
    ids: list[int]
    metadata: dict = field(default_factory=dict)
    templated: bool = False
