"""DQN targets and helpers (Mnih et al. 2015; van Hasselt et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def dqn_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-step TD targets for Q-learning.

    DQN (Mnih et al. 2015): ``y = r + gamma * (1 - term) * max_a Q_target(s', a)``.
    Double DQN (van Hasselt et al. 2016), when ``next_q_online`` is given::

        a* = argmax_a Q_online(s', a)
        y  = r + gamma * (1 - term) * Q_target(s', a*)

    Only ``terminated`` cuts the bootstrap; a time-limit truncation still bootstraps.

    Args:
        rewards: ``[B]`` rewards.
        terminated: ``[B]`` bool or {0, 1}.
        next_q_target: ``[B, A]`` target-network Q-values at s'.
        gamma: Discount factor.
        next_q_online: ``[B, A]`` online-network Q-values at s' (enables double DQN).

    Returns:
        ``[B]`` float32 targets.
    """
    if next_q_online is None:
        next_value = next_q_target.max(dim=-1).values
    else:
        best = next_q_online.argmax(dim=-1, keepdim=True)
        next_value = next_q_target.gather(-1, best).squeeze(-1)
    return rewards.float() + gamma * (1.0 - terminated.float()) * next_value.float()


def dqn_loss(q_taken: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Huber (smooth L1, delta=1) TD loss ``mean(huber(Q(s, a) - y))``.

    Args:
        q_taken: ``[B]`` Q(s, a) of the taken actions.
        targets: ``[B]`` TD targets (no gradient).

    Returns:
        Scalar loss.
    """
    return nn.functional.smooth_l1_loss(q_taken, targets)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta_online + (1 - tau) * theta_target (tau=1: hard copy).

    Args:
        target: Module updated in place.
        online: Source module with identically shaped parameters.
        tau: Interpolation weight in (0, 1].
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        if tau >= 1.0:
            t.copy_(o)
        else:
            t.mul_(1.0 - tau).add_(o, alpha=tau)
