"""Preference losses: DPO (sigmoid), IPO, cDPO / label smoothing, hinge, Bradley-Terry,
and the reward model's regularisers (SFT NLL, GRM).

Inputs are per-pair sequence log-probabilities: ``[B]`` tensors of log pi(y | x) summed
over a completion's tokens (prompt tokens excluded), for the chosen y_w and the rejected
y_l, under the policy and under the frozen reference. Notation::

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))

the difference of the implicit rewards r(y) = beta (log pi(y) - log pi_ref(y)) divided by
beta (Rafailov et al. 2023, "Direct Preference Optimization").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and the implicit rewards of both completions.

    With h as in the module docstring::

        sigmoid (DPO, Rafailov et al. 2023), with cDPO label smoothing eps (Mitchell 2023):
            l = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
        ipo (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
            Human Preferences"):
            l = (h - 1 / (2 beta))^2
        hinge (SLiC, Zhao et al. 2023):
            l = max(0, 1 - beta h)

    For ``ipo`` pass length-normalised log-probs (mean over tokens), as the IPO paper's
    token-level formulation and TRL do; the other losses take sums.

    Args:
        policy_chosen: ``[B]`` log pi(y_w | x). policy_rejected: ``[B]`` log pi(y_l | x).
        ref_chosen: ``[B]`` log pi_ref(y_w | x). ref_rejected: ``[B]`` log pi_ref(y_l | x).
        beta: Strength of the KL constraint (> 0).
        loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
        label_smoothing: eps in [0, 0.5): the probability that a label is flipped (cDPO);
            sigmoid only.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the rewards
        ``beta (log pi - log pi_ref)`` are detached.

    Raises:
        ValueError: Unknown ``loss_type``, ``beta <= 0`` or ``label_smoothing`` outside [0, 0.5).
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(
            f"unknown preference loss {loss_type!r}; expected one of {PREFERENCE_LOSSES}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_losses(
    reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Pairwise reward-model loss under the Bradley-Terry model (Bradley & Terry 1952;
    Ouyang et al. 2022, InstructGPT's reward model)::

        P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))
        l = -log sigma(r_w - r_l - m)

    with an optional margin m (Llama 2's margin loss, Touvron et al. 2023).

    Args:
        reward_chosen: ``[B]`` scalar rewards r(x, y_w). reward_rejected: ``[B]`` r(x, y_l).
        margin: m >= 0.

    Returns:
        ``[B]`` losses.
    """
    return -F.logsigmoid(reward_chosen - reward_rejected - margin)


def grm_sft_regularizer(chosen_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """GRM's SFT regulariser of a reward model (Yang et al. 2024, "Regularizing Hidden
    States Enables Learning Generalizable Reward Model for LLMs", the SFT form of L_reg)::

        L_reg = -log sigma(beta * log pi(y_w | x)),   log pi(y_w | x) = sum_t log pi(y_w,t | x, y_w,<t)

    ``log pi`` is read from the reward model's own last hidden states through the LM head
    and *summed* over the chosen completion's tokens; the sigmoid keeps the term on the
    scale of the Bradley-Terry loss. Combine with :func:`grm_losses`.

    Args:
        chosen_logps: ``[B]`` summed log pi(y_w | x) of the chosen completions.
        beta: beta > 0 (the paper's 0.1).

    Returns:
        ``[B]`` regulariser values.

    Raises:
        ValueError: ``beta <= 0``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return -F.logsigmoid(beta * chosen_logps)


def grm_losses(bt_losses: torch.Tensor, regularizer: torch.Tensor, alpha: float) -> torch.Tensor:
    """GRM's total reward-model loss (Yang et al. 2024)::

        L = (1 - alpha) * L_BT + alpha * L_reg

    a convex combination, unlike an added SFT term (``L_BT + c * NLL``): alpha (the paper's
    0.01) also scales the Bradley-Terry loss down.

    Args:
        bt_losses: ``[B]`` Bradley-Terry losses (:func:`bradley_terry_losses`).
        regularizer: ``[B]`` L_reg (:func:`grm_sft_regularizer`).
        alpha: alpha in [0, 1).

    Returns:
        ``[B]`` losses.

    Raises:
        ValueError: ``alpha`` outside [0, 1).
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return (1 - alpha) * bt_losses + alpha * regularizer


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Sequence log-probability from per-token ones: ``sum_t m_t log p_t`` (or its mean).

    Args:
        token_logps: ``[B, L]`` log-probs of the completion tokens (prompt excluded).
        mask: ``[B, L]`` 1 on real completion tokens.
        average: Divide by the number of real tokens (IPO's length-normalised form).

    Returns:
        ``[B]`` log-probabilities.
    """
    w = mask.to(token_logps.dtype)
    total = (token_logps.masked_fill(mask == 0, 0.0) * w).sum(-1)
    return total / w.sum(-1).clamp_min(1.0) if average else total
