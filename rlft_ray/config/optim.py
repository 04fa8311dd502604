"""The optimizer section every LM learner section nests as ``optim``: AdamW and its schedule.

One definition, one set of range checks; each algorithm section sets its own paper
defaults (``field(default_factory=lambda: OptimConfig(lr=1e-6))``), and a run file or override
addresses the fields as ``grpo.optim.lr``. A key given for ``optim`` replaces only that
field: the rest keep the section's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlft_ray.config.errors import require

LRSchedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with a warmup and a decay over the run.

    Attributes:
        lr: Peak learning rate.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` decay over the run, after a
            linear warmup over ``warmup_fraction`` of it.
        warmup_fraction: Share of the run spent warming up from 0 to ``lr``, in [0, 1).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: Gradients are clipped to this global norm before each step.
        betas: Adam's moment decay rates (beta1, beta2).
    """

    lr: float = 1e-5
    lr_schedule: LRSchedule = "constant"
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(
            all(0 <= b < 1 for b in self.betas),
            "betas",
            f"must both be in [0, 1) (got {list(self.betas)})",
        )


#: Keys a section held before they moved into its ``optim`` section: naming one fails
#: with the new place instead of an "unknown key".
OPTIM_KEYS: tuple[str, ...] = (
    "lr",
    "lr_schedule",
    "warmup_fraction",
    "weight_decay",
    "max_grad_norm",
)


def _offline_optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, lr_schedule="linear", warmup_fraction=0.1)


@dataclass(frozen=True)
class OfflinePasses:
    """What every offline LM section shares (``dpo``, ``reward_model``, ``simpo``, ``orpo``,
    ``kto``, ``ilql``): passes over a fixed data set in optimizer steps of ``batch_size``
    examples over all ranks, micro-batched with gradient accumulation.

    Attributes:
        num_epochs: Passes over the data (sets the run's iterations).
        batch_size: Examples (pairs, completions) per optimizer step, over all ranks.
        micro_batch_size: Examples per forward/backward.
        shuffle: Reshuffle the data every epoch.
        optim: AdamW and its schedule (:class:`OptimConfig`); a section may set its own
            default.
    """

    num_epochs: int = 1
    batch_size: int = 32
    micro_batch_size: int = 16
    shuffle: bool = True
    optim: OptimConfig = field(default_factory=_offline_optim)

    def __post_init__(self) -> None:
        require(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
