"""The one interface the training loop talks to.

A learner owns the trainable modules and optimizer on one Ray Train rank and
knows three things the loop does not: which rollout actor feeds it
(``sampler_cls`` / :meth:`Learner.sampler_kwargs`), how to turn a batch into an
update (:meth:`Learner.update`), and which weights the actors need
(:meth:`Learner.policy_state`). Nothing here imports Ray, so unit tests can
drive a learner directly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import torch
import torch.distributed as dist
from torch import nn

from rlft_ray.config import RunConfig
from rlft_ray.rollout.env_runner import EnvRunner


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite; the run stops before stepping on it."""


@dataclass(frozen=True)
class Spaces:
    """Observation and action space of the task, read once by the driver."""

    observation: gym.Space
    action: gym.Space


@dataclass(frozen=True)
class LearnerContext:
    """Where this learner runs: its DDP rank, the world size and the device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Learner(ABC):
    """Algorithm-specific half of the loop (PPO, DQN, ...).

    Args:
        cfg: The run config (the learner reads ``cfg.algo_config``).
        spaces: Task spaces.
        ctx: Rank, world size and device.
    """

    #: Plain class the driver wraps with ``ray.remote`` for rollouts.
    sampler_cls: ClassVar[type] = EnvRunner
    #: Metric that ranks checkpoints (higher is better).
    score_metric: ClassVar[str] = "rollout/episode_return_mean"

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        self.cfg = cfg
        self.spaces = spaces
        self.ctx = ctx
        self.optimizer: torch.optim.Optimizer

    # -- what the actors need -------------------------------------------------------
    @classmethod
    @abstractmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        """The policy module the rollout actors act with (same class the learner trains)."""

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        """Constructor kwargs of rollout actor ``index`` (env runners by default)."""
        from functools import partial

        return {
            "env_cfg": cfg.env,
            "make_policy": partial(_policy_from_spaces, cls, cfg),
            "rollout_steps": cfg.algo_config.rollout_steps,
            "seed": cfg.seed + 10_007 * (index + 1),
            "num_threads": max(1, int(cfg.resources.cpus_per_rollout_actor)),
        }

    @abstractmethod
    def policy_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights the actors load after each update."""

    # -- learning ---------------------------------------------------------------------
    @abstractmethod
    def update(self, batch: Any, progress: float) -> dict[str, float]:
        """One learning step on ``batch``; returns namespaced metrics (``loss/...``).

        Args:
            batch: This rank's batch (e.g. a :class:`~rlft_ray.types.RolloutBatch`).
            progress: Fraction of the run's budget done before this batch, in [0, 1].
        """

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints as ``{name}.safetensors`` (``policy`` first)."""

    def after_init_from(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Hook run after ``init_from`` loaded module weights (e.g. sync a target net)."""

    # -- helpers for subclasses -------------------------------------------------------
    def wrap_ddp(self, module: nn.Module) -> nn.Module:
        """Move to the device and wrap in DDP when there is more than one rank."""
        module.to(self.ctx.device)
        if self.ctx.world_size > 1:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (identity for one rank)."""
        if self.ctx.world_size > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.ctx.world_size
        return values

    def global_mean_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``x`` over all ranks' elements (equal-sized shards)."""
        stats = torch.stack([x.mean(), (x * x).mean()])
        mean, sq = self.all_reduce_mean(stats)
        n = x.numel() * self.ctx.world_size
        var = (sq - mean * mean).clamp(min=0.0) * n / max(n - 1, 1)
        return mean, var.sqrt()

    @staticmethod
    def check_finite(name: str, value: torch.Tensor | float) -> None:
        """Raise :class:`NonFiniteLossError` naming ``name`` if ``value`` is NaN/inf."""
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"{name} became {v} — stopping before the optimizer steps on it "
                "(check rewards/observations for NaN, or lower the learning rate)"
            )


def _policy_from_spaces(
    cls: type[Learner], cfg: RunConfig, obs_space: gym.Space, act_space: gym.Space
) -> nn.Module:
    return cls.make_policy(cfg, Spaces(obs_space, act_space))


def to_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy array -> tensor on ``device``."""
    return torch.as_tensor(x, dtype=dtype, device=device)
