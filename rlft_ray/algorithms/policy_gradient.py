"""The GRPO family's later variants: GSPO's sequence-level ratio, DAPO's overlong reward
shaping and dynamic-sampling filter, REINFORCE++'s globally normalised advantages.

Conventions as in :mod:`rlft_ray.algorithms.lm`: right-padded responses of ``L`` tokens,
``mask [B, L]`` 1 on real tokens, per-token log-probs ``[B, L]``, the ``G`` completions of
one prompt contiguous rows. Nothing here reads a config object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlft_ray.algorithms.masked import masked_mean, masked_whiten, zero_padding


def gspo_sequence_policy_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's clipped surrogate on the sequence-level importance ratio (Zheng et al. 2025,
    "Group Sequence Policy Optimization"), as per-token losses before aggregation.

    The ratio of completion i is the length-normalised likelihood ratio::

        s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|)
            = exp( (1 / |y_i|) sum_t m_it (log pi(y_it) - log pi_old(y_it)) )
        l_i = max( -A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high) )

    and the whole sequence is clipped or not. ``l_i`` is written on every real token of row
    i, so the ``seq-mean-token-mean`` aggregation gives the paper's ``(1/G) sum_i l_i``
    (``token-mean`` would weight rows by length instead). The gradient is that of the
    sequence objective (each token's log-prob enters s_i with weight 1 / |y_i|); the
    paper's GSPO-token variant has the same value and, with sequence advantages, the same
    gradient. The paper's clip ranges are small (3e-4 / 4e-4): the ratio is per token.

    Args:
        logprobs: ``[B, L]`` log pi of the sampled tokens (with grad).
        old_logprobs: ``[B, L]`` log pi_old (the sampler's).
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, L]`` bool or {0, 1}.
        clip_low: eps_low. clip_high: eps_high (None: ``clip_low``).

    Returns:
        ``(loss_mat [B, L], stats)``: losses (0 on padding) and detached ``[B, L]``
        ``approx_kl`` ((s - 1) - log s of the row) and ``clip_frac`` (1 on the tokens of a
        clipped row).
    """
    if clip_high is None:
        clip_high = clip_low
    seq_log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)  # [B]
    ratio = seq_log_ratio.exp()
    adv = advantages.reshape(-1).to(ratio.dtype)
    seq_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    loss_mat = zero_padding(seq_loss.unsqueeze(-1).expand_as(logprobs), mask)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).float()
        approx_kl = (ratio - 1.0) - seq_log_ratio
        stats = {
            "approx_kl": approx_kl.unsqueeze(-1).expand_as(logprobs).detach(),
            "clip_frac": clipped.unsqueeze(-1).expand_as(logprobs),
        }
    return loss_mat, stats


@torch.no_grad()
def overlong_reward_penalty(
    lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

    With L_max = ``max_tokens`` and L_cache = ``buffer``::

        R_length(y) = 0                                  |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                    = -1                                 L_max < |y|

    scaled by ``penalty`` (verl's ``overlong_buffer.penalty_factor``): a completion that
    runs into the length limit loses up to ``penalty`` of reward, linearly over the last
    ``buffer`` tokens.

    Args:
        lengths: ``[B]`` completion lengths in tokens.
        max_tokens: L_max, the generation limit.
        buffer: L_cache >= 1, tokens before the limit where the penalty ramps up.
        penalty: Weight of the penalty (1: the paper's).

    Returns:
        ``[B]`` float32 penalties in ``[-penalty, 0]``.

    Raises:
        ValueError: ``buffer`` < 1 or > ``max_tokens``.
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    n = lengths.float()
    ramp = ((max_tokens - buffer) - n) / buffer
    r = torch.where(n <= max_tokens - buffer, torch.zeros_like(n), ramp)
    r = torch.where(n > max_tokens, torch.full_like(n, -1.0), r)
    return penalty * r


@torch.no_grad()
def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO's dynamic-sampling filter (Yu et al. 2025, eq. 11's constraint
    ``0 < |{o_i : is_equivalent(a, o_i)}| < G``): which groups hold different rewards.

    A group whose G rewards are all equal (all right, all wrong) has group-relative
    advantages of 0: it costs an update's compute and contributes no gradient.

    Args:
        rewards: ``[B]`` rewards, ``B = prompts * group_size``, groups contiguous.
        group_size: G.

    Returns:
        ``[B // G]`` bool, True where the group's rewards are not all equal.
    """
    grouped = rewards.reshape(-1, group_size)
    return grouped.max(dim=-1).values != grouped.min(dim=-1).values


@torch.no_grad()
def reinforce_pp_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    kl_coef: float,
    group_size: int,
    baseline: bool,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++ token advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach
    for Aligning Large Language Models"; OpenRLHF's ``reinforce`` / ``reinforce_baseline``).

    The sequence score goes on the last real token, a per-token KL penalty on every token,
    and each token's advantage is its return (gamma = 1), normalised over the *global*
    batch (every token of every rank) instead of per group::

        baseline:  r_i <- r_i - mean_g(r)          (REINFORCE++-baseline; else r_i as is)
        rew_it   = -kl_coef * kl_it + r_i [t = |y_i|]
        G_it     = sum_{s >= t} m_is rew_is
        A_it     = (G_it - mean(G)) / std(G)      over all real tokens of the batch

    Args:
        scores: ``[B]`` sequence rewards.
        mask: ``[B, L]`` bool or {0, 1}.
        kl: ``[B, L]`` per-token KL estimates (k1 in the paper), or None.
        kl_coef: beta.
        group_size: G (used with ``baseline``).
        baseline: Subtract each group's mean reward first.
        reduce: Sums the whitening moments over ranks (None: this batch only).

    Returns:
        ``[B, L]`` float32 advantages, 0 on padding.
    """
    r = scores.float().reshape(-1)
    if baseline:
        grouped = r.reshape(-1, group_size)
        r = (grouped - grouped.mean(dim=-1, keepdim=True)).reshape(-1)
    w = mask.float()
    rewards = torch.zeros_like(w) if kl is None else -kl_coef * zero_padding(kl.float(), mask)
    positions = torch.arange(w.shape[-1], device=w.device).expand(w.shape)
    last = torch.where(w != 0, positions, -1).max(dim=-1).values  # [B]; -1: no token
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]
    rewards[rows, last[rows]] += r[rows]
    returns = (rewards * w).flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{s >= t} rew_s
    return masked_whiten(returns, mask, reduce=reduce)
