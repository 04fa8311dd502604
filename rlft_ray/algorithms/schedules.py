"""Schedules: learning-rate warmup/decay and linear ramps (pure Python, no tensors)."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(progress: float, schedule: str, warmup: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``progress`` through the run.

    A linear warmup over the first ``warmup`` of the run (Goyal et al. 2017), then decay
    over the rest, with ``f = (progress - warmup) / (1 - warmup)`` clipped to [0, 1]::

        warmup:    factor = progress / warmup                 (progress < warmup)
        constant:  factor = 1
        linear:    factor = 1 - f                              (PPO's ``anneal_lr``)
        cosine:    factor = 0.5 * (1 + cos(pi * f))            (Loshchilov & Hutter 2017)

    Args:
        progress: Fraction of the run's budget done, in [0, 1].
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        warmup: Fraction of the run spent warming up, in [0, 1).

    Returns:
        The factor in [0, 1].

    Raises:
        ValueError: Unknown ``schedule``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if warmup > 0 and progress < warmup:
        return progress / warmup
    frac = min(max((progress - warmup) / max(1e-9, 1.0 - warmup), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return 1.0


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """Linear interpolation from ``start`` to ``end`` over ``duration``, then flat.

    Args:
        start: Value at t = 0.
        end: Value from t = duration on.
        duration: Length of the ramp (> 0).
        t: Current time (steps, or a fraction of the run).

    Returns:
        The scheduled value.
    """
    frac = min(max(t / duration, 0.0), 1.0) if duration > 0 else 1.0
    return start + frac * (end - start)
