"""PPO losses (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")."""

from __future__ import annotations

import torch


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, as a loss to minimise.

    With ratio rho = exp(log pi(a|s) - log pi_old(a|s))::

        L = mean( max( -A * rho, -A * clip(rho, 1 - eps, 1 + eps) ) )

    Args:
        logprobs: ``[B]`` log-probs of the taken actions under the current policy.
        old_logprobs: ``[B]`` log-probs under the sampling policy.
        advantages: ``[B]`` advantage estimates (already normalised if wanted).
        clip_coef: eps, the clip range.

    Returns:
        ``(loss, stats)`` where ``stats`` holds detached ``approx_kl`` (the k3
        estimator mean((rho - 1) - log rho), Schulman 2020) and ``clip_frac``
        (fraction of samples with |rho - 1| > eps).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_coef).float().mean(),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float | None,
) -> torch.Tensor:
    """Value loss, optionally clipped around the sampling-time values (as in PPO2/CleanRL).

    Unclipped: ``0.5 * mean((V - R)^2)``. Clipped, with
    V_clip = V_old + clip(V - V_old, -eps, eps)::

        0.5 * mean( max( (V - R)^2, (V_clip - R)^2 ) )

    Args:
        values: ``[B]`` current value predictions.
        old_values: ``[B]`` value predictions at sampling time.
        returns: ``[B]`` return targets (A + V_old).
        clip_coef: eps, or None for the unclipped loss.

    Returns:
        Scalar loss.
    """
    unclipped = (values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped).mean()
