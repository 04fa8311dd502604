"""DAPO's dynamic sampling (Yu et al. 2025): keep only groups whose rewards differ, sample
more prompts until the batch is full again.

A plain function over :class:`~rlft_ray.types.GenerationBatch` es; the training loop passes
a ``sample_more`` that samples one more round from the rank's actors (tests pass a stub).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rlft_ray.algorithms.policy_gradient import informative_groups
from rlft_ray.types import GenerationBatch, SelectionStats


def fill_batch(
    first: GenerationBatch,
    sample_more: Callable[[], GenerationBatch],
    max_rounds: int,
    target_groups: int | None = None,
) -> GenerationBatch:
    """The informative groups of ``first`` and of up to ``max_rounds`` more batches, until
    ``target_groups`` of them are in hand (surplus groups of the last round are dropped).

    Still short after ``max_rounds``, the batch holds the informative groups found; with
    none at all it is ``first`` whole (its group advantages are 0: no policy gradient,
    only the KL term, as without filtering).

    Args:
        first: The iteration's batch as sampled (no selection applied).
        sample_more: Samples one more batch of as many prompts (the next ones).
        max_rounds: Extra rounds allowed (0: filter only).
        target_groups: Groups wanted (default: ``first``'s).

    Returns:
        The batch, with ``selection`` recording every generated sample (so env steps and
        episode returns count them all) and ``filtered_groups``, ``extra_samples``,
        ``resample_rounds`` set.
    """
    if first.selection is not None:
        raise ValueError("dynamic sampling takes batches without a selection applied")
    size = first.group_size
    target = len(first) // size if target_groups is None else target_groups
    parts, accepted_all, batches = [], [], []
    kept = filtered = rounds = extra = 0
    batch = first
    while True:
        groups = informative_groups(torch.as_tensor(batch.rewards), size).numpy()
        filtered += int((~groups).sum())
        chosen = np.flatnonzero(groups)[: max(target - kept, 0)]
        accepted = np.zeros(len(batch), dtype=bool)
        for g in chosen:
            accepted[g * size : (g + 1) * size] = True
        batches.append(batch)
        accepted_all.append(accepted)
        if accepted.any():
            parts.append(batch.take(accepted))
        kept += len(chosen)
        if kept >= target or rounds >= max_rounds:
            break
        batch = sample_more()
        rounds += 1
        extra += len(batch)
    if not parts:  # nothing informative: the first batch as it is
        parts = [first]
        accepted_all[0][:] = True
    out = GenerationBatch.concat(parts)
    out.selection = SelectionStats(
        rewards=np.concatenate([b.rewards for b in batches]).astype(np.float32),
        lengths=np.concatenate([b.response_mask.sum(axis=1) for b in batches]).astype(np.int64),
        accepted=np.concatenate(accepted_all),
    )
    out.peak_rss_mb = (
        tuple(np.max([b.peak_rss_mb for b in batches], axis=0).tolist())
        if all(len(b.peak_rss_mb) == len(first.peak_rss_mb) for b in batches)
        else first.peak_rss_mb
    )
    out.generate_s = sum(b.generate_s for b in batches)
    out.filtered_groups, out.extra_samples, out.resample_rounds = filtered, extra, rounds
    return out
