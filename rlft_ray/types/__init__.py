"""Typed data that crosses the actor/learner boundary (dataclasses with documented shapes).

:mod:`.episodes`: ``RolloutBatch``, ``EpisodeBatch``, ``EpisodeStats`` and the
``SelectionStats`` of rejection sampling; :mod:`.agents`: ``AgentStats`` of multi-turn
episodes; :mod:`.lm`: ``Prompt``, ``GenerationBatch``
and ``PairBatch``, with ``pad_sequences`` (their padding convention).
"""

from rlft_ray.types.agents import AgentStats
from rlft_ray.types.episodes import (
    UNSYNCED_VERSION,
    EpisodeBatch,
    EpisodeStats,
    RolloutBatch,
    SelectionStats,
)
from rlft_ray.types.lm import GenerationBatch, PairBatch, Prompt, pad_sequences

__all__ = [
    "UNSYNCED_VERSION",
    "AgentStats",
    "EpisodeBatch",
    "EpisodeStats",
    "GenerationBatch",
    "PairBatch",
    "Prompt",
    "RolloutBatch",
    "SelectionStats",
    "pad_sequences",
]
