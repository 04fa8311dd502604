"""The per-actor half of ``rlft-ray sample``: generate, score and select a batch of prompts.

:class:`BatchSampler` is the callable class Ray Data runs in an actor pool
(``map_batches``); it wraps a :class:`~rlft_ray.rollout.generation.GenerationActor` with
a selection rule and turns each batch of prompt rows into one row per generated sample.
Plain Python: tests call it directly.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from rlft_ray.config import LMConfig, RSFTConfig
from rlft_ray.lm.prompts import prompts_from_batch
from rlft_ray.rollout.generation import GenerationActor

#: The columns of every sample row (``accepted`` marks the kept ones; ``prompt``,
#: ``completion`` and ``metadata`` are None in the others).
SAMPLE_COLUMNS = (
    "prompt_index",
    "sample",
    "prompt",
    "completion",
    "reward",
    "logprob",
    "policy_version",
    "accepted",
    "metadata",
)


class BatchSampler:
    """Samples ``lm.num_samples`` completions per prompt row and marks the accepted ones.

    Args:
        lm: Model, sampling and reward settings.
        selection: The ``rsft`` section (the rule).
        seed: Base seed; each batch reseeds with ``seed + its first prompt index``, so the
            output does not depend on which actor got which batch (the running reward
            maximum and an estimated log M, if used, still depend on the order).
        num_threads: torch threads (the CPUs this actor holds).
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        lm: LMConfig,
        selection: RSFTConfig,
        seed: int,
        num_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        self.seed = seed
        scorers = None
        if lm.reward_model is not None:  # scored in this actor, as the run's reward
            from rlft_ray.rollout.scoring import RewardModelScorer

            scorers = [
                RewardModelScorer(
                    list(lm.reward_models),
                    num_threads,
                    device,
                    add_special_tokens=not lm.chat_template,
                    std_coef=lm.reward_ensemble_std_coef,
                    clip=lm.reward_clip,
                )
            ]
        self.actor = GenerationActor(
            lm,
            seed=seed,
            num_threads=num_threads,
            device=device,
            selection=selection,
            scorers=scorers,
        )
        self.actor.policy_version = 0  # nothing publishes here: lm.model as loaded is version 0

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Prompt rows (``prompt``, ``prompt_ids``, ``metadata``, ``prompt_index``) in, one
        row per sample out (:data:`SAMPLE_COLUMNS`)."""
        first = int(rows["prompt_index"].min())
        torch.manual_seed(self.seed + first)
        self.actor.selector.generator.manual_seed(self.seed + first)
        prompts = prompts_from_batch(rows)
        batch = self.actor.generate(prompts)
        batch.rewards = self.actor.score(batch)
        selected = self.actor.select(batch)
        keep = np.asarray(selected.selection.accepted, dtype=bool)
        n = batch.group_size
        # Text only for the accepted samples: a rejected one is counted by its reward and
        # flag, and the driver, which shares the cores with the actors, moves and writes
        # a twentieth of the bytes.
        text = [i for i in range(len(keep)) if keep[i]]
        prompts, completions, metadata = ([None] * len(keep) for _ in range(3))
        for i in text:
            prompts[i], completions[i] = batch.prompts[i], batch.completions[i]
            metadata[i] = json.dumps(batch.metadata[i], default=str)
        return pd.DataFrame(
            {
                "prompt_index": np.repeat(rows["prompt_index"].to_numpy(), n),
                "sample": np.tile(np.arange(n), len(rows)),
                "prompt": prompts,
                "completion": completions,
                "reward": batch.rewards.astype(np.float64),
                "logprob": batch.logprobs.sum(axis=1).astype(np.float64),
                "policy_version": batch.policy_version,
                "accepted": keep,
                "metadata": metadata,
            },
            columns=list(SAMPLE_COLUMNS),
        )
