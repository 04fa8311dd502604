"""Batch plumbing of the LM learners: cutting padding off micro-batches, the padding row a
rank with no rows runs, token counts, and the multi-turn episodes' metrics."""

from __future__ import annotations

import logging

import torch

from rlft_ray.learners.ddp import LearnerContext, all_reduce_mean
from rlft_ray.types import GenerationBatch

logger = logging.getLogger(__name__)


def agent_metrics(batch: GenerationBatch, ctx: LearnerContext) -> dict[str, float]:
    """Multi-turn episodes' ``rollout/*`` numbers (turns, tool calls, env seconds,
    truncation, failures; :meth:`~rlft_ray.types.AgentStats.metrics`), averaged over the
    ranks, and ``rollout/reward_timeouts``; nothing for a single-turn batch without timeouts."""
    out: dict[str, float] = {}
    if batch.agent is not None:
        local = batch.agent.metrics()
        names = sorted(local)
        values = torch.tensor([local[k] for k in names], dtype=torch.float64, device=ctx.device)
        out.update(zip(names, all_reduce_mean(values, ctx).tolist()))
        for reason in batch.agent.reasons[:1]:  # one per batch in the log is enough
            logger.warning("an episode failed: %s", reason)
    if batch.reward_timeouts or batch.agent is not None:
        out["rollout/reward_timeouts"] = float(batch.reward_timeouts)
    return out


def trim_padding(sub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop all-padding prompt columns on the left and response columns on the right."""
    p_keep = int(sub["prompt_mask"].any(0).long().argmax()) if sub["prompt_mask"].any() else 0
    r_len = int(sub["mask"].any(0).nonzero().max()) + 1 if sub["mask"].any() else 1
    return {
        "prompt_ids": sub["prompt_ids"][:, p_keep:],
        "prompt_mask": sub["prompt_mask"][:, p_keep:],
        "response_ids": sub["response_ids"][:, :r_len],
        "mask": sub["mask"][:, :r_len],
    }


def rows_cut_to(
    tensors: dict[str, torch.Tensor], idx: torch.Tensor, width: int
) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every ``[B, L]`` / ``[B]`` tensor in ``t``, cut to ``width`` tokens."""
    out = {}
    for key, val in tensors.items():
        if key in ("prompt_ids", "prompt_mask"):
            continue
        v = val[idx]
        out[key] = v[:, :width] if v.dim() == 2 else v
    return out


def padding_row(tensors: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """One row shaped like ``t``'s rows with no real response token (its loss weighs 0):
    what a rank with no rows of a minibatch runs so that DDP's all-reduce still meets."""
    row = {}
    for key, val in tensors.items():
        shape = (1, max(1, val.shape[1])) if val.dim() == 2 else (1,)
        row[key] = torch.zeros(shape, dtype=val.dtype, device=val.device)
    row["prompt_ids"] = row["prompt_ids"].fill_(pad_id)
    row["prompt_mask"][:, -1] = True  # one attended position keeps attention well defined
    return row


def row_tokens(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` prompt + completion tokens of each row (what a micro-batch's budget counts)."""
    return tensors["prompt_mask"].sum(-1) + tensors.get("attn_mask", tensors["mask"]).sum(-1)


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
