"""ILQL: Implicit Language Q-Learning (Snell et al. 2022, "Offline RL for Natural Language
Generation with Implicit Language Q Learning"), token-level and offline.

Each completion token is an action a_t taken in state s_t = (prompt, y_<t); the episode
ends after the completion's last token, and the sequence's reward arrives on that token
(:func:`~rlft_ray.algorithms.lm.token_rewards` without KL). Heads on the LM's last hidden
state give, per state, two Q vectors over the vocabulary (twin Q, Fujimoto et al. 2018),
their Polyak-averaged targets Q-hat, and a scalar V. Following IQL (Kostrikov et al. 2021)
V is fit by expectile regression to min(Q-hat1, Q-hat2)(s, a) on dataset actions only, and
Q by a TD step to r + gamma V(s'), so no action outside the data is ever maximised over;
a CQL term (Kumar et al. 2020) keeps Q low on actions the data did not take. Decoding
perturbs the behaviour policy's logits by beta (Q - V) (:func:`value_guided_logits`).

Shapes: ``B`` completions, ``L`` completion tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """Asymmetric squared loss of IQL / ILQL (Kostrikov et al. 2021, Eq. 5)::

        L_tau(u) = |tau - 1(u < 0)| u^2,   u = Q-hat(s, a) - V(s)

    tau > 0.5 fits V towards an upper expectile of Q over the data's actions (tau = 0.5:
    the mean, plain regression; tau -> 1: the max).

    Args:
        diff: ``[*]`` u = target - prediction.
        tau: The expectile, in (0, 1).

    Returns:
        ``[*]`` losses.

    Raises:
        ValueError: ``tau`` outside (0, 1).
    """
    if not 0 < tau < 1:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    weight = torch.where(diff < 0, 1.0 - tau, tau).to(diff.dtype)
    return weight * diff.pow(2)


def td_targets(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    td_lambda: float = 0.0,
) -> torch.Tensor:
    """TD targets of Q: one-step (Snell et al. 2022, Eq. 2) or lambda-returns.

    One step (``td_lambda = 0``, ILQL's)::

        y_t = r_t + gamma * V(s_{t+1}) * (1 - done_t)

    where the state after a completion's last real token is terminal (V = 0). With
    ``td_lambda`` > 0 the target is the lambda-return (Sutton & Barto 2018, Sec. 12.1;
    Peng's Q(lambda)), computed backwards from the terminal state::

        G_t = r_t + gamma * (1 - done_t) * ((1 - lambda) V(s_{t+1}) + lambda G_{t+1})

    ``td_lambda = 1`` is the Monte Carlo return of the data's completion (the sequence's
    reward, discounted). Mixing in the return carries the reward to every token at once
    instead of through V of each later prefix, which a small model may not yet fit.
    Detached.

    Args:
        rewards: ``[B, L]`` per-token rewards (0 on padding).
        values: ``[B, L]`` V(s_t), the state before completion token t.
        mask: ``[B, L]`` 1 on real completion tokens (right-padded).
        gamma: Discount in [0, 1].
        td_lambda: lambda in [0, 1] (0: one-step TD).

    Returns:
        ``[B, L]`` targets, 0 on padding.
    """
    m = mask.to(values.dtype)
    next_mask = F.pad(m[:, 1:], (0, 1))  # 0 after the last real token: terminal
    next_values = F.pad(values[:, 1:], (0, 1)) * next_mask
    if td_lambda == 0.0:
        return ((rewards + gamma * next_values) * m).detach()
    rewards, next_values = rewards.detach().to(values.dtype), next_values.detach()
    targets = torch.zeros_like(next_values)
    g_next = torch.zeros_like(next_values[:, 0])
    for t in reversed(range(values.shape[1])):
        bootstrap = (1.0 - td_lambda) * next_values[:, t] + td_lambda * next_mask[:, t] * g_next
        g_next = rewards[:, t] + gamma * bootstrap
        targets[:, t] = g_next
    return (targets * m).detach()


def cql_loss(q_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Conservative Q-learning term (Kumar et al. 2020, CQL(H); Snell et al. 2022, Eq. 4)::

        L_CQL(s, a) = log sum_a' exp Q(s, a') - Q(s, a)

    the cross-entropy of Q read as logits against the data's action.

    Args:
        q_all: ``[B, L, V]`` Q(s_t, .). actions: ``[B, L]`` the data's tokens.

    Returns:
        ``[B, L]`` losses.
    """
    q_all = q_all.float()
    return torch.logsumexp(q_all, -1) - q_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def ilql_token_losses(
    q1_all: torch.Tensor,
    q2_all: torch.Tensor,
    target_q1: torch.Tensor,
    target_q2: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    actions: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    tau: float,
    td_lambda: float = 0.0,
) -> dict[str, torch.Tensor]:
    """ILQL's per-token loss terms (Snell et al. 2022, Sec. 4; trlX's ``ILQLConfig.loss``)::

        y_t   = r_t + gamma V(s_{t+1})      (V detached; a lambda-return with td_lambda)
        q     = (Q1(s_t, a_t) - y_t)^2 + (Q2(s_t, a_t) - y_t)^2
        v     = L_tau(min(Q-hat1, Q-hat2)(s_t, a_t) - V(s_t))      (Q-hat: Polyak targets)
        cql   = CE(Q1(s_t, .), a_t) + CE(Q2(s_t, .), a_t)

    The learner adds them as ``q + v_coef v + cql_coef cql`` plus the behaviour-cloning
    NLL of the LM (``bc_coef``); the caller masks and aggregates.

    Args:
        q1_all, q2_all: ``[B, L, V]`` the twin Q heads' outputs.
        target_q1, target_q2: ``[B, L]`` the target heads' Q of the data's action (no grad).
        values: ``[B, L]`` V(s_t) (with grad).
        rewards: ``[B, L]`` per-token rewards. actions: ``[B, L]`` tokens. mask: ``[B, L]``.
        gamma: Discount. tau: Expectile. td_lambda: lambda of :func:`td_targets`.

    Returns:
        ``{"q": [B, L], "v": [B, L], "cql": [B, L]}``, 0 on padding.
    """
    m = mask.to(values.dtype)
    targets = td_targets(rewards, values, mask, gamma, td_lambda)
    q1 = q1_all.float().gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    q2 = q2_all.float().gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    q_loss = ((q1 - targets) ** 2 + (q2 - targets) ** 2) * m
    q_hat = torch.minimum(target_q1, target_q2).detach()
    v_loss = expectile_loss(q_hat - values, tau) * m
    cql = (cql_loss(q1_all, actions) + cql_loss(q2_all, actions)) * m
    return {"q": q_loss, "v": v_loss, "cql": cql}


def value_guided_logits(
    logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float
) -> torch.Tensor:
    """ILQL's decoding distribution (Snell et al. 2022, Sec. 4.3)::

        pi(a | s) ∝ pi_beta(a | s) exp(beta (Q(s, a) - V(s)))
        => logits'(a) = log_softmax(logits)(a) + beta (Q(s, a) - V(s))

    Args:
        logits: ``[N, V]`` the behaviour LM's next-token logits.
        q: ``[N, V]`` min of the target Q heads. v: ``[N]`` or ``[N, 1]`` V(s).
        beta: Strength of the value guidance (0: the LM itself).

    Returns:
        ``[N, V]`` float32 logits.
    """
    v = v.reshape(*q.shape[:-1], 1)
    return torch.log_softmax(logits.float(), -1) + beta * (q.float() - v.float())


def awac_weights(
    advantages: torch.Tensor, temperature: float, max_weight: float = 20.0
) -> torch.Tensor:
    """Advantage-weighted behaviour cloning weights (AWAC, Nair et al. 2020; AWR, Peng et
    al. 2019), for ILQL's policy term::

        w_t = min(exp(A(s_t, a_t) / lambda), w_max),   A = min(Q-hat1, Q-hat2) - V

    so the LM's NLL favours the data's better-than-expected tokens (lambda -> inf: plain
    BC, trlX's default). Detached.

    Args:
        advantages: ``[B, L]`` A(s_t, a_t). temperature: lambda > 0.
        max_weight: w_max, the clip that keeps one token from dominating.

    Returns:
        ``[B, L]`` weights.

    Raises:
        ValueError: ``temperature <= 0``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.exp(advantages.detach().float() / temperature).clamp(max=max_weight)
