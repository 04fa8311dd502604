"""KTO: Kahneman-Tversky optimisation from unpaired desirable / undesirable completions
(Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

Each example is one completion y of a prompt x with a binary label (desirable or not);
the implicit reward is DPO's ``r(x, y) = log pi(y | x) - log pi_ref(y | x)`` (summed over
the completion's tokens) and the reference point z0 is the policy's KL to the reference,
estimated from *mismatched* pairs (x_i, y_j), i != j, of the same batch.
"""

from __future__ import annotations

import torch


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Eq. 7 and Sec. 4.1; TRL's estimate)::

        z0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])

    over mismatched pairs (x_j, y'_j) (TRL: y'_j is the batch's completions rotated by
    one). Detached: no gradient flows through z0.

    Args:
        policy_kl_logps: ``[M]`` summed log pi of the mismatched completions.
        ref_kl_logps: ``[M]`` the same under the reference.

    Returns:
        Scalar z0 >= 0 (0 for an empty batch).
    """
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros(())
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp_min(0.0)


def kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (Ethayarajh et al. 2024, Eq. 8; TRL's ``loss_type="kto"``)::

        r = log pi(y | x) - log pi_ref(y | x)
        v(x, y) = lambda_D sigma(beta (r - z0))   if y is desirable
                  lambda_U sigma(beta (z0 - r))   if y is undesirable
        l = lambda_y - v(x, y)       (TRL: lambda_y (1 - sigma(...)), the same value)

    Args:
        policy_logps: ``[B]`` summed log pi(y | x). ref_logps: ``[B]`` under the reference.
        desirable: ``[B]`` bool labels.
        z0: The reference point (:func:`kto_reference_point`), scalar.
        beta: beta > 0 (TRL and the paper: 0.1).
        desirable_weight: lambda_D > 0. undesirable_weight: lambda_U > 0 (the paper keeps
            lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    Returns:
        ``(losses [B], rewards [B])``: the rewards ``beta r`` are detached.

    Raises:
        ValueError: ``beta`` or a weight not > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError("desirable_weight and undesirable_weight must be > 0")
    ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    sign = torch.where(desirable, 1.0, -1.0).to(ratio.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(ratio.dtype)
    losses = weight * (1 - torch.sigmoid(beta * sign * (ratio - z0)))
    return losses, beta * ratio.detach()
