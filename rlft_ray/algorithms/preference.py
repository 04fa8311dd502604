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


def simpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: a reference-free, length-normalised preference loss with a target margin
    (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Eq. 6)::

        r(y) = beta / |y| * log pi(y | x)        (the mean token log-prob, times beta)
        l = -log sigma(r(y_w) - r(y_l) - gamma)

    with cDPO-style label smoothing eps as TRL's ``CPOTrainer(loss_type="simpo")`` has it:
    ``l = -(1 - eps) log sigma(z) - eps log sigma(-z)``, z = r(y_w) - r(y_l) - gamma.

    Args:
        policy_chosen: ``[B]`` mean token log-prob of y_w under the policy (length-normalised).
        policy_rejected: ``[B]`` the same for y_l.
        beta: Reward scale beta > 0 (the paper's 2.0 - 2.5).
        gamma: Target reward margin gamma >= 0 (the paper's 0.5 - 1.6).
        label_smoothing: eps in [0, 0.5).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; the rewards
        ``beta / |y| log pi(y)`` are detached.

    Raises:
        ValueError: ``beta <= 0``, ``gamma < 0`` or ``label_smoothing`` outside [0, 0.5).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    rew_c, rew_r = beta * policy_chosen, beta * policy_rejected
    z = rew_c - rew_r - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, rew_c.detach(), rew_r.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012): ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` further out. ``[*] -> [*]``."""
    x = x.clamp(max=-1e-7)  # log-probs are < 0; a sequence of probability 1 would give -inf
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_or: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: supervised fine-tuning plus an odds-ratio preference term, no reference
    (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", Eqs. 2-7)::

        odds(y | x) = P(y | x) / (1 - P(y | x)),  P(y | x) = exp(mean_t log pi(y_t | x, y_<t))
        log OR = log odds(y_w) - log odds(y_l)
               = (log P_w - log P_l) - (log(1 - P_w) - log(1 - P_l))
        l = NLL(y_w) + lambda * (-log sigma(log OR))

    Args:
        policy_chosen: ``[B]`` mean token log-prob of y_w (length-normalised, as the paper
            and TRL take P). policy_rejected: ``[B]`` the same for y_l.
        chosen_nll: ``[B]`` the SFT term: mean token NLL of y_w.
        lambda_or: lambda >= 0, the odds-ratio term's weight (TRL's ``beta``, 0.1).

    Returns:
        ``(losses [B], or_losses [B] (-log sigma(log OR), detached), log_odds [B] (detached))``.

    Raises:
        ValueError: ``lambda_or < 0``.
    """
    if lambda_or < 0:
        raise ValueError(f"lambda_or must be >= 0, got {lambda_or}")
    log_odds = (policy_chosen - policy_rejected) - (
        log1mexp(policy_chosen) - log1mexp(policy_rejected)
    )
    or_losses = -F.logsigmoid(log_odds)
    return chosen_nll + lambda_or * or_losses, or_losses.detach(), log_odds.detach()
