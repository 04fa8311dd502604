"""Advantage estimators."""

from __future__ import annotations

import torch


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    bootstrap_values: torch.Tensor,
    last_values: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation").

    With d_t = terminated_t or truncated_t, and time-limit bootstrapping
    (Pardo et al. 2018) folded into the reward::

        r'_t    = r_t + gamma * truncated_t * V(s_final)
        delta_t = r'_t + gamma * (1 - d_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lambda * (1 - d_t) * A_{t+1}
        R_t     = A_t + V(s_t)

    V(s_{t+1}) is ``values[t + 1]`` inside the segment and ``last_values`` after
    its last step.

    Args:
        rewards: ``[T, N]`` rewards.
        values: ``[T, N]`` V(s_t) under the sampling policy.
        terminated: ``[T, N]`` bool or {0, 1}: the MDP ended after step t.
        truncated: ``[T, N]`` bool or {0, 1}: a time limit ended the episode after step t.
        bootstrap_values: ``[T, N]`` V(final observation) where truncated (ignored elsewhere).
        last_values: ``[N]`` V(s_T) of the observation after the last step.
        gamma: Discount factor.
        gae_lambda: GAE lambda (0: one-step TD, 1: Monte Carlo).

    Returns:
        ``(advantages, returns)``, each ``[T, N]`` float32.
    """
    rewards = rewards.float()
    values = values.float()
    term = terminated.float()
    trunc = truncated.float()
    done = torch.clamp(term + trunc, max=1.0)
    rewards = rewards + gamma * trunc * (1.0 - term) * bootstrap_values.float()
    next_values = torch.cat([values[1:], last_values.float().unsqueeze(0)], dim=0)
    deltas = rewards + gamma * (1.0 - done) * next_values - values

    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(last_values, dtype=torch.float32)
    for t in reversed(range(rewards.shape[0])):
        last_gae = deltas[t] + gamma * gae_lambda * (1.0 - done[t]) * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


def normalize_advantages(
    advantages: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Standardise advantages: (A - mean) / (std + eps).

    Args:
        advantages: Any shape.
        mean: Optional precomputed mean (e.g. all-reduced across DDP ranks).
        std: Optional precomputed standard deviation.
        eps: Guards division for constant advantages.

    Returns:
        Tensor of the input's shape.
    """
    mean = advantages.mean() if mean is None else mean
    std = advantages.std() if std is None else std
    return (advantages - mean) / (std + eps)
