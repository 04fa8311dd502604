"""Token-level algorithms for RL fine-tuning of causal language models.

Conventions shared by every function here:

* Responses are right-padded to a common length ``L``.
* ``mask`` is ``[B, L]`` (bool or float) with 1 on real response tokens and 0 on
  padding. Masked reductions treat it as 0/1 weights.
* Log-probs are ``[B, L]``: one entry per response token (log pi(y_t | x, y_<t)).

Nothing here reads a config object: coefficients are explicit arguments.
"""

from __future__ import annotations

import torch

from rlft_ray.algorithms.masked import (
    aggregate_loss_parts,
    masked_mean,
    masked_sum,
    masked_whiten,
    zero_padding,
)

__all__ = [
    "aggregate_loss_parts",
    "chunked_token_logps",
    "group_advantages",
    "kl_penalty",
    "masked_gae",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "ppo_token_policy_losses",
    "ppo_token_value_losses",
    "selective_log_softmax",
    "token_rewards",
    "truncated_is_weights",
]
_KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
_ADV_ESTIMATORS = ("grpo", "rloo", "reinforce")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token sample estimators of KL(pi || pi_ref), with tokens sampled from pi.

    From Schulman (2020), "Approximating KL Divergence". With
    ``log r = log pi_ref(y_t) - log pi(y_t) = ref_logprobs - logprobs``::

        k1 = -log r                      (unbiased, high variance, can be < 0)
        k2 = 0.5 * (log r)^2             (biased, low variance, >= 0)
        k3 = (r - 1) - log r             (unbiased, low variance, >= 0)

    ``"low_var_kl"`` is accepted as an alias of ``"k3"`` (verl's name). k3 is
    computed as ``expm1(log r) - log r`` for accuracy near r = 1. No clamping is
    applied.

    Args:
        logprobs: ``[B, L]`` log-probs of the sampled tokens under pi.
        ref_logprobs: ``[B, L]`` log-probs of the same tokens under pi_ref.
        kind: One of ``"k1"``, ``"k2"``, ``"k3"``, ``"low_var_kl"``.

    Returns:
        ``[B, L]`` per-token KL estimates (padding is not masked here).

    Raises:
        ValueError: Unknown ``kind``.
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind in ("k3", "low_var_kl"):
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {_KL_KINDS}")


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str,
    eps: float = 1e-6,
    std_normalize: bool = True,
) -> torch.Tensor:
    """Sequence-level advantages from scalar rewards, with a group or batch baseline.

    ``rewards`` holds ``num_prompts * group_size`` entries, the ``group_size``
    completions of one prompt contiguous. For completion i of group g::

        "grpo":      A_i = (r_i - mean_g) / (std_g + eps)
                     (Shao et al. 2024, "DeepSeekMath"; GRPO)
                     std_normalize=False: A_i = r_i - mean_g   (Dr. GRPO, Liu et al. 2025)
        "rloo":      A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean_g)
                     (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE ...")
        "reinforce": A_i = r_i - mean(r over the whole batch)
                     (REINFORCE with a mean baseline, Williams 1992)

    std_g is the *unbiased* (Bessel-corrected, ``torch.std`` default) standard
    deviation within the group, as in the DeepSeekMath/TRL/verl implementations;
    with ``group_size == 1`` it is taken as 0. ``std_normalize`` only affects
    ``"grpo"``; ``"reinforce"`` ignores the grouping.

    Args:
        rewards: ``[B]`` scalar rewards, ``B = num_prompts * group_size``.
        group_size: G, completions per prompt (>= 1; >= 2 for ``"rloo"``).
        estimator: ``"grpo"``, ``"rloo"`` or ``"reinforce"``.
        eps: Added to std_g in ``"grpo"`` (a constant group gives 0, not NaN).
        std_normalize: Divide by std_g in ``"grpo"``.

    Returns:
        ``[B]`` float32 advantages (no gradient).

    Raises:
        ValueError: Unknown ``estimator``, ``group_size`` < 1 (or < 2 for
            ``"rloo"``), or ``B`` not a multiple of ``group_size``.
    """
    if estimator not in _ADV_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; expected one of {_ADV_ESTIMATORS}"
        )
    r = rewards.float().reshape(-1)
    if estimator == "reinforce":
        return r - r.mean()
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.numel() % group_size != 0:
        raise ValueError(f"{r.numel()} rewards is not a multiple of group_size={group_size}")
    grouped = r.view(-1, group_size)
    mean = grouped.mean(dim=-1, keepdim=True)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
        adv = grouped - (grouped.sum(dim=-1, keepdim=True) - grouped) / (group_size - 1)
        return adv.reshape(-1)
    adv = grouped - mean
    if std_normalize:
        if group_size > 1:
            std = grouped.std(dim=-1, keepdim=True)
        else:
            std = torch.zeros_like(mean)
        adv = adv / (std + eps)
    return adv.reshape(-1)


@torch.no_grad()
def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards with the KL penalty folded in (KL-in-reward shaping).

    As in Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
    Preferences") and Ouyang et al. 2022 (InstructGPT)::

        r_t = -kl_coef * kl_t * m_t + score * [t == last real token]

    Args:
        scores: ``[B]`` sequence-level scores (reward model / verifier).
        kl: ``[B, L]`` per-token KL estimates (e.g. ``kl_penalty(..., "k1")``), or
            None for no penalty.
        mask: ``[B, L]`` bool or {0, 1}; the last non-zero position of each row
            receives the score (a row with no real token receives nothing).
        kl_coef: beta, the KL coefficient.

    Returns:
        ``[B, L]`` float32 rewards, 0 on padding (no gradient).
    """
    if kl is None:
        rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        rewards = -kl_coef * zero_padding(kl.float(), mask)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    last = torch.where(mask != 0, positions, -1).max(dim=-1).values  # [B]; -1: no token
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]
    rewards[rows, last[rows]] += scores.float().reshape(-1)[rows]
    return rewards


@torch.no_grad()
def masked_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation over response tokens (Schulman et al. 2016).

    Each response is one episode whose steps are its real tokens; the value after
    the last real token is 0 (the episode ends with the response)::

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = m_t * (delta_t + gamma * lambda * A_{t+1})
        R_t     = m_t * (A_t + V_t)

    with V_{L} = A_{L} = 0. Responses are assumed right-padded (a gap in the mask
    would cut the bootstrap there). Padded positions get 0.

    Args:
        token_rewards: ``[B, L]`` per-token rewards (e.g. from ``token_rewards``).
        values: ``[B, L]`` critic values V_t at sampling time (state: prompt + y_<t).
        mask: ``[B, L]`` bool or {0, 1}.
        gamma: Discount factor per token.
        lam: GAE lambda (0: one-step TD, 1: Monte Carlo).

    Returns:
        ``(advantages, returns)``, each ``[B, L]`` float32 (no gradient).
    """
    w = mask.float()
    r = zero_padding(token_rewards.float(), mask)
    v = zero_padding(values.float(), mask)
    length = r.shape[-1]
    advantages = torch.zeros_like(r)
    last_gae = torch.zeros_like(r[:, 0])
    for t in reversed(range(length)):
        next_v = v[:, t + 1] if t + 1 < length else torch.zeros_like(last_gae)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last_gae = (delta + gamma * lam * last_gae) * w[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + v) * w
    return advantages, returns


@torch.no_grad()
def gapped_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the masked tokens only, skipping the gaps between them (multi-turn
    episodes: the model's turns, with the environment's replies in between).

    The steps of each row are its masked tokens in order; for a step t whose next masked
    token is t' (none after the last: V = 0)::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lambda * A_{t'}
        R_t     = A_t + V_t

    i.e. :func:`masked_gae` on each row's masked tokens packed to the left, scattered
    back; unmasked positions get 0 (their rewards and values are ignored). With no gaps
    (right-padded rows) it equals :func:`masked_gae`.

    Args:
        token_rewards: ``[B, L]`` per-token rewards (a turn's reward on its last token).
        values: ``[B, L]`` critic values at sampling time.
        mask: ``[B, L]`` bool or {0, 1}: the model's tokens.
        gamma: Discount per model token. lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``[B, L]`` float32.
    """
    keep = mask != 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # masked first, in order
    packed_mask = keep.gather(-1, order)
    adv, ret = masked_gae(
        token_rewards.float().gather(-1, order),
        values.float().gather(-1, order),
        packed_mask,
        gamma,
        lam,
    )
    return (
        torch.zeros_like(adv).scatter(-1, order, adv),
        torch.zeros_like(ret).scatter(-1, order, ret),
    )


def ppo_token_policy_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO clipped surrogate (Schulman et al. 2017) as losses to minimise, before
    aggregation (the step engine aggregates them with ``loss_agg``).

    With rho_t = exp(log pi(y_t) - log pi_old(y_t))::

        l_t = max( -A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high) )

    ``clip_high`` defaults to ``clip_low`` (symmetric PPO); a larger value is DAPO's
    "clip-higher" (Yu et al. 2025). Sequence-level advantages ``[B]`` (GRPO/RLOO) are
    broadcast over the tokens of each row.

    Args:
        logprobs: ``[B, L]`` log-probs under the current policy (with grad).
        old_logprobs: ``[B, L]`` log-probs under the sampling policy.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, L]``.
        clip_low: eps_low. clip_high: eps_high (None: ``clip_low``).

    Returns:
        ``(loss_mat, stats)``: ``[B, L]`` losses and detached ``[B, L]`` per-token
        ``approx_kl`` ((rho - 1) - log rho) and ``clip_frac`` (1 where rho was clipped).
    """
    if clip_high is None:
        clip_high = clip_low
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    with torch.no_grad():
        clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
        stats = {"approx_kl": (ratio - 1.0) - log_ratio, "clip_frac": clipped.float()}
    return torch.max(pg_loss1, pg_loss2), stats


def ppo_token_value_losses(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float | None,
) -> torch.Tensor:
    """Per-token value losses, optionally clipped around the sampling-time values, before
    aggregation.

    Unclipped: ``0.5 * (V - R)^2``. Clipped, with V_clip = V_old + clip(V - V_old, -eps, eps)
    (PPO2; Ziegler et al. 2019): ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    Returns:
        ``[B, L]`` losses (padding is not masked here).
    """
    unclipped = (values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped
    clipped_values = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped)


def selective_log_softmax(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities ``[B, T]`` of the given tokens under the logits, in float32.

    ``out[b, t] = log_softmax(logits[b, t])[tokens[b, t]]
    = logits[b, t, tokens[b, t]] - logsumexp(logits[b, t])``.

    No shifting is done: for a causal LM pass ``logits[:, :-1]`` and
    ``input_ids[:, 1:]``. Low-precision logits are upcast one row at a time, so
    peak extra memory is one ``[T, V]`` float32 slice rather than ``[B, T, V]``.

    Args:
        logits: ``[B, T, V]`` unnormalised logits (any floating dtype).
        tokens: ``[B, T]`` integer token ids.

    Returns:
        ``[B, T]`` float32 log-probs (differentiable w.r.t. ``logits``).
    """
    index = tokens.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, index).squeeze(-1)
        return (selected - torch.logsumexp(logits, dim=-1)).float()
    rows = []
    for row_logits, row_index in zip(logits, index):
        row = row_logits.float()
        rows.append(row.gather(-1, row_index).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def _chunk_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of :func:`chunked_token_logps`: ``[n]`` log-probs and ``[n]`` entropies."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [n, V]
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logps, torch.zeros_like(lse).detach()
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        ent = lse - (probs * logits).sum(-1)
    return logps, ent


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` under the output head, never holding ``[B, T, V]`` logits.

    With logits z = (h W^T + b) / T over a vocabulary of V::

        log p(y_t) = z_t[y_t] - logsumexp(z_t)        H_t = logsumexp(z_t) - sum_v p_tv z_tv

    computed ``chunk_tokens`` positions at a time in float32. Under autograd each chunk
    (unless the whole pass is one chunk of at most 4M logits, a tiny vocabulary's case)
    runs as an activation checkpoint (``torch.utils.checkpoint``): its ``[n, V]`` logits
    are recomputed in the backward pass instead of stored, so the peak extra memory is
    one chunk's logits, not the batch's (for a 49k vocabulary, 32 x 80 tokens would be
    0.5 GB of float32 logits and as much again for their log-softmax). The same idea as
    TRL's ``selective_log_softmax`` and Liger's fused linear cross-entropy.

    Args:
        hidden: ``[B, T, H]`` last hidden states (the final norm applied).
        weight: ``[V, H]`` output head (tied embeddings included). bias: ``[V]`` or None.
        tokens: ``[B, T]`` the token each position predicts.
        temperature: Logits are divided by it (the sampling policy's log-probs).
        chunk_tokens: Positions per chunk.
        entropy: Also return the (detached) entropies; zeros otherwise.

    Returns:
        ``(logps [B, T] float32, entropy [B, T] float32)``.
    """
    from torch.utils.checkpoint import checkpoint

    batch, length, size = hidden.shape
    flat_h, flat_t = hidden.reshape(-1, size), tokens.reshape(-1)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # one small chunk (a tiny vocabulary): storing its logits costs less than recomputing them
    one_small = flat_h.shape[0] <= chunk_tokens and flat_h.shape[0] * weight.shape[0] <= 1 << 22
    grad = grad and not one_small
    logps, ents = [], []
    for start in range(0, flat_h.shape[0], chunk_tokens):
        args = (
            flat_h[start : start + chunk_tokens],
            weight,
            bias,
            flat_t[start : start + chunk_tokens],
        )
        if grad:  # the chunk's logits are recomputed in backward instead of stored
            lp, ent = checkpoint(_chunk_logps, *args, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logps(*args, temperature, entropy)
        logps.append(lp)
        ents.append(ent.detach())
    if not logps:
        empty = hidden.new_zeros((batch, length), dtype=torch.float32)
        return empty, empty
    return torch.cat(logps).view(batch, length), torch.cat(ents).view(batch, length)


@torch.no_grad()
def truncated_is_weights(
    learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling between the learner's and the sampler's policy.

    When the sampler (a vLLM engine, bf16 kernels) and the learner compute slightly
    different distributions for the same weights, the tokens were drawn from
    pi_sampler, not pi_learner. Each token's loss is weighted by::

        w_t = min( pi_learner(y_t) / pi_sampler(y_t), C )

    (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training"; verl's and OpenRLHF's ``tis_imp_ratio_cap``), and the PPO ratio is taken
    against the learner's own log-probs of the sampling weights.

    Args:
        learner_logprobs: ``[B, L]`` log pi_learner of the sampled tokens (sampling weights).
        sampler_logprobs: ``[B, L]`` log pi_sampler the actors recorded.
        cap: C > 0.

    Returns:
        ``[B, L]`` detached weights in (0, C].
    """
    return (learner_logprobs - sampler_logprobs).exp().clamp(max=cap)
