"""What the multi-turn rollouts of LM agents record about their episodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Failure reasons kept per batch (the count is exact, the list a sample).
MAX_REASONS = 8


@dataclass
class AgentStats:
    """Every episode a generation actor ran in text environments (E = episodes), whether
    or not a selection rule passed it to the learner.

    Attributes:
        returns: ``[E]`` float32 summed turn rewards.
        turns: ``[E]`` int64 model turns.
        tool_calls: ``[E]`` int64 parsed tool calls (``info["tool_calls"]`` summed).
        tool_errors: ``[E]`` int64 turns whose tool call failed or could not be parsed.
        truncated: ``[E]`` bool: ended by the env's time limit, ``lm.max_turns``, the token
            budget or a failure, not by ``terminated``.
        success: ``[E]`` bool ``info["is_success"]`` at the end (False where never set).
        failed: ``[E]`` bool: a step timed out, raised or broke the text protocol.
        env_s: Seconds spent in environment steps (tools included), summed over actors.
        reasons: Up to :data:`MAX_REASONS` failure reasons, for the log.
    """

    returns: np.ndarray
    turns: np.ndarray
    tool_calls: np.ndarray
    tool_errors: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    failed: np.ndarray
    env_s: float = 0.0
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.turns.shape[0])

    def metrics(self) -> dict[str, float]:
        """``rollout/turns_mean``, ``rollout/tool_calls_mean``, ``rollout/tool_errors_mean``,
        ``rollout/env_s``, ``rollout/truncated_frac``, ``rollout/failed_episodes`` and
        ``rollout/agent_success_rate`` of these episodes."""
        n = max(len(self), 1)
        return {
            "rollout/turns_mean": float(self.turns.sum() / n),
            "rollout/tool_calls_mean": float(self.tool_calls.sum() / n),
            "rollout/tool_errors_mean": float(self.tool_errors.sum() / n),
            "rollout/env_s": float(self.env_s),
            "rollout/truncated_frac": float(self.truncated.sum() / n),
            "rollout/failed_episodes": float(self.failed.sum()),
            "rollout/agent_success_rate": float(self.success.sum() / n),
        }

    @staticmethod
    def concat(stats: Sequence[AgentStats]) -> AgentStats:
        """Join the actors' episodes."""
        cat = lambda name: np.concatenate([getattr(s, name) for s in stats])  # noqa: E731
        return AgentStats(
            returns=cat("returns"),
            turns=cat("turns"),
            tool_calls=cat("tool_calls"),
            tool_errors=cat("tool_errors"),
            truncated=cat("truncated"),
            success=cat("success"),
            failed=cat("failed"),
            env_s=sum(s.env_s for s in stats),
            reasons=[r for s in stats for r in s.reasons][:MAX_REASONS],
        )
