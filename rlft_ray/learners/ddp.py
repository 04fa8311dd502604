"""Data-parallel helpers as functions of a learner's context (rank, world size, device).

Every learner rank calls these the same number of times in the same order; with one
rank they are plain local operations, so learners run unchanged without
``torch.distributed`` (unit tests drive them directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlft_ray.algorithms import masked_whiten
from rlft_ray.core.errors import DeterministicError


class NonFiniteLossError(DeterministicError, FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the run stops before stepping on it."""


@dataclass(frozen=True)
class LearnerContext:
    """Where a learner runs: its DDP rank, the world size, the device and its data.

    ``datasets`` maps the names of ``TaskProbe.datasets`` to this rank's shard (a Ray
    Data ``DataIterator`` under Ray Train; anything with ``iter_batches`` in tests);
    ``tables`` holds ``TaskProbe.tables``, whole on every rank.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    datasets: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)


def wrap_ddp(module: nn.Module, ctx: LearnerContext) -> nn.Module:
    """Move ``module`` to the device and wrap it in DDP when there is more than one rank."""
    module.to(ctx.device)
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def global_sum(x: torch.Tensor, ctx: LearnerContext) -> torch.Tensor:
    """Element-wise sum of ``x`` over ranks (``x`` itself for one rank)."""
    if ctx.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_max(x: torch.Tensor, ctx: LearnerContext) -> torch.Tensor:
    """Element-wise maximum of ``x`` over ranks (``x`` itself for one rank)."""
    if ctx.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def rank0_decides(flag: bool, ctx: LearnerContext) -> bool:
    """Rank 0's ``flag`` on every rank: for decisions read off a clock, where ranks that
    decided apart would hang in their next collective."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_mean(x: torch.Tensor, ctx: LearnerContext) -> torch.Tensor:
    """Element-wise mean of ``x`` over ranks (``x`` itself for one rank)."""
    return global_sum(x, ctx) / ctx.world_size if ctx.world_size > 1 else x


def global_mean_std(x: torch.Tensor, ctx: LearnerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of ``x`` over all ranks' elements (equal-sized shards)."""
    mean, sq = all_reduce_mean(torch.stack([x.mean(), (x * x).mean()]), ctx)
    n = x.numel() * ctx.world_size
    var = (sq - mean * mean).clamp(min=0.0) * n / max(n - 1, 1)
    return mean, var.sqrt()


def global_masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, ctx: LearnerContext, eps: float = 1e-8
) -> torch.Tensor:
    """:func:`~rlft_ray.algorithms.masked_whiten` with statistics over every rank's tokens.

    Args:
        x: ``[B, L]`` values. mask: ``[B, L]`` bool or {0, 1}.

    Returns:
        ``[B, L]``, 0 on padding.
    """
    return masked_whiten(x, mask, eps=eps, reduce=lambda moments: global_sum(moments, ctx))


def check_finite(name: str, value: torch.Tensor | float) -> None:
    """Raise :class:`NonFiniteLossError` naming ``name`` if ``value`` is NaN/inf."""
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteLossError(
            f"{name} became {v} — stopping before the optimizer steps on it "
            "(check rewards/observations for NaN, or lower the learning rate)"
        )
