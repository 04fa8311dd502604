"""Selection rules of rejection sampling: which of B sampled completions (or episodes) to keep.

Grouped rules take the G samples of one prompt as contiguous rows (``B = num_groups * G``),
as in :class:`~rlft_ray.types.GenerationBatch`. Every rule returns a ``[B]`` bool mask;
random choices (tie breaks, acceptance draws) come from an explicit ``torch.Generator``
so a seeded run selects the same samples.

A NaN reward or log-probability has no rank (a descending sort would put it first, so
best-of-N would keep it): every rule refuses one with a ``ValueError`` naming the sample
(:func:`check_no_nan`). Rewards are validated finite where they are computed; this is the
last line of defence for rules called directly.

Statistical acceptance works in log space throughout: ``log a = min(0, log p - log q - log M)``
is compared with ``log u``, ``u ~ U(0, 1)``; no raw density ratio is ever exponentiated.
"""

from __future__ import annotations

from fractions import Fraction

import torch

SELECTION_RULES = ("all", "best_of_n", "threshold", "quantile", "acceptance")


def check_no_nan(values: torch.Tensor, what: str = "reward") -> None:
    """Refuse NaN entries: they cannot be ranked or compared with a threshold.

    Args:
        values: ``[B]`` rewards or log-probabilities.
        what: What the values are, for the message.

    Raises:
        ValueError: Some entry is NaN; the message names the first such sample.
    """
    nan = torch.isnan(values.reshape(-1))
    if bool(nan.any()):
        index = int(nan.nonzero()[0])
        raise ValueError(
            f"{what} of sample {index} is nan ({int(nan.sum())} of {nan.numel()} are nan): "
            "a NaN cannot be ranked; the selection refuses it"
        )


def _rank_within_groups(
    scores: torch.Tensor, group_size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``[B]`` rank of each row inside its group by ``scores`` (0 = highest); ties broken at random.

    A random permutation first, then a *stable* sort by descending score: equal scores keep
    the random order, so every tied sample is equally likely to rank first.
    """
    grouped = scores.double().reshape(-1, group_size)
    noise = torch.rand(grouped.shape, generator=generator, dtype=torch.float64)
    shuffle = noise.argsort(dim=-1)
    by_score = grouped.gather(-1, shuffle).argsort(dim=-1, descending=True, stable=True)
    order = shuffle.gather(-1, by_score)  # row indices of each group, best first
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(group_size).expand_as(order))
    return ranks.reshape(-1)


def best_of_n_mask(
    rewards: torch.Tensor, group_size: int, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Best-of-N: keep the ``k`` highest-reward completions of each prompt's ``group_size``.

    The selection step of expert iteration / RAFT (Dong et al. 2023, "RAFT: Reward rAnked
    FineTuning") and of best-of-N sampling (Nakano et al. 2021)::

        keep_i = [ rank_g(r_i) < k ]     rank within the group, ties broken uniformly at random

    Args:
        rewards: ``[B]`` rewards, ``B = num_groups * group_size``.
        group_size: N, completions per prompt.
        k: Completions kept per prompt (``k >= group_size`` keeps all).
        generator: Seeds the tie break.

    Returns:
        ``[B]`` bool mask with ``min(k, N)`` True per group.

    Raises:
        ValueError: ``k < 1``, ``B`` not a multiple of ``group_size``, or a NaN reward.
    """
    check_no_nan(rewards)
    if k < 1:
        raise ValueError(f"best-of-n needs k >= 1, got {k}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return _rank_within_groups(rewards, group_size, generator) < k


def threshold_mask(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """Keep every sample whose reward reaches the threshold: ``keep_i = [r_i >= tau]``.

    Args:
        rewards: ``[B]`` rewards.
        tau: Threshold.

    Returns:
        ``[B]`` bool mask.

    Raises:
        ValueError: A NaN reward.
    """
    check_no_nan(rewards)
    return rewards >= tau


def quantile_mask(
    rewards: torch.Tensor,
    fraction: float,
    group_size: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep the top ``fraction`` q of the batch, or of each group (ReST's improve step
    with a quantile filter; Gulcehre et al. 2023)::

        keep_i = [ rank(r_i) < ceil(q * n) ]     n = B (batch) or group_size (per group)

    A count, not a reward cut-off: exactly ``ceil(q * n)`` samples per batch or group are
    kept, ties at the boundary broken at random (seeded). The count is computed exactly on
    the decimal q was written as (see :func:`quantile_count`), not in floating point.

    Args:
        rewards: ``[B]`` rewards.
        fraction: q in (0, 1].
        group_size: Rank within groups of this size; None ranks the whole batch.
        generator: Seeds the tie break.

    Returns:
        ``[B]`` bool mask.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or a NaN reward.
    """
    check_no_nan(rewards)
    if not 0 < fraction <= 1:
        raise ValueError(f"quantile fraction must be in (0, 1], got {fraction}")
    n = int(rewards.numel()) if group_size is None else group_size
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    return best_of_n_mask(rewards, n, quantile_count(fraction, n), generator)


def quantile_count(fraction: float, n: int) -> int:
    """``max(1, ceil(q * n))`` in exact rational arithmetic on q's shortest decimal repr.

    A configured q such as ``0.14`` is stored as the nearest binary float, slightly above
    7/50, and ``0.14 * 50`` evaluates to ``7.000000000000001`` in floating point, whose
    ceiling keeps 8 of 50 instead of 7. ``str(q)`` is the shortest decimal that rounds to
    the same float (Python's repr guarantee), i.e. the decimal the user wrote for any q
    with at most 15 significant digits; ``Fraction`` of it is that decimal exactly, so
    ``ceil`` of ``Fraction(str(q)) * n`` is the intended count. No tolerance is needed,
    and a q whose product is genuinely just above an integer (``0.141 * 50``) still
    rounds up.

    Args:
        fraction: q in (0, 1].
        n: Number of samples ranked.

    Returns:
        The number of samples to keep, at least 1.
    """
    exact = Fraction(str(fraction)) * n
    return max(1, -(-exact.numerator // exact.denominator))


def tilted_log_acceptance(rewards: torch.Tensor, beta: float, reward_max: float) -> torch.Tensor:
    """log a(c) for the reward-tilted target p(c) ∝ q(c) exp(r(c) / beta).

    Statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling
    Improves Preference Optimization", Algorithm 1): with Z = E_q[exp(r / beta)],
    p(c) / q(c) = exp(r(c) / beta) / Z, and M = exp(r_max / beta) / Z bounds that ratio when
    ``r_max >= sup r``, so::

        a(c) = p(c) / (M q(c)) = exp((r(c) - r_max) / beta)
        log a(c) = min(0, (r(c) - r_max) / beta)

    Exact when ``reward_max`` is a true upper bound of the reward (a verifier's 1.0):
    accepted samples are then distributed exactly as p. Approximate with a running
    maximum of the rewards seen so far: it can sit below the supremum, and samples above
    it are clipped to a = 1, which under-weights p's best region until the maximum
    catches up (the clipping is visible as ``log a`` hitting 0 above the bound).

    Args:
        rewards: ``[B]`` rewards r(c).
        beta: Temperature beta > 0 (small: close to best-of-N; large: close to q).
        reward_max: r_max, a known bound or the running maximum.

    Returns:
        ``[B]`` float64 log acceptance probabilities, <= 0.

    Raises:
        ValueError: ``beta <= 0``, or a NaN reward.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    check_no_nan(rewards)
    return ((rewards.double() - reward_max) / beta).clamp(max=0.0)


def ratio_log_acceptance(
    target_logp: torch.Tensor, proposal_logp: torch.Tensor, log_m: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log a(c) = min(0, log p(c) - log q(c) - log M) for a target model p and proposal q.

    Classic rejection sampling (von Neumann 1951): a sample c ~ q is accepted with
    probability a(c) = p(c) / (M q(c)); if M >= sup p/q the accepted samples are exactly
    p-distributed and the acceptance rate is 1/M. A configured or estimated M that is too
    small leaves a(c) > 1 for some c: those are clipped to 1 (accepted with probability 1,
    under-representing them relative to p) and flagged, so the clipping rate can be reported.

    Args:
        target_logp: ``[B]`` log p(c), summed over a completion's tokens.
        proposal_logp: ``[B]`` log q(c) under the sampling policy, summed likewise.
        log_m: log M.

    Returns:
        ``(log_a, clipped)``: ``[B]`` float64 log acceptance probabilities (<= 0) and a
        ``[B]`` bool mask of samples whose ratio exceeded M.

    Raises:
        ValueError: A NaN log-probability (``-inf``, probability 0, is valid).
    """
    check_no_nan(target_logp, "target log-prob")
    check_no_nan(proposal_logp, "proposal log-prob")
    log_ratio = target_logp.double() - proposal_logp.double() - log_m
    return log_ratio.clamp(max=0.0), log_ratio > 0


def estimate_log_m(target_logp: torch.Tensor, proposal_logp: torch.Tensor) -> float:
    """log M from a warm-up batch: the largest observed log p(c) - log q(c).

    An empirical bound: samples of later batches with a larger ratio are clipped
    (see :func:`ratio_log_acceptance`), so the clipping rate says how good it was.

    Args:
        target_logp: ``[B]`` log p. proposal_logp: ``[B]`` log q (B >= 1).

    Returns:
        log M as a float.

    Raises:
        ValueError: A NaN log-probability.
    """
    check_no_nan(target_logp, "target log-prob")
    check_no_nan(proposal_logp, "proposal log-prob")
    return float((target_logp.double() - proposal_logp.double()).max())


def accept_mask(log_a: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the acceptances: ``keep_i = [log u_i < log a_i]``, ``u_i ~ U(0, 1)`` (seeded).

    Args:
        log_a: ``[B]`` log acceptance probabilities (<= 0).
        generator: Seeds the uniform draws.

    Returns:
        ``[B]`` bool mask; each entry is True with probability ``exp(log_a_i)``.
    """
    u = torch.rand(log_a.shape, generator=generator, dtype=torch.float64)
    return torch.log(u) < log_a


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square goodness-of-fit of observed ``counts`` against ``probs``.

    ``X^2 = sum_k (O_k - E_k)^2 / E_k`` with ``E_k = n p_k``; under the null X^2 follows a
    chi-square law with K - 1 degrees of freedom, whose survival function is the
    regularised upper incomplete gamma ``Q((K - 1) / 2, X^2 / 2)``.

    Args:
        counts: ``[K]`` observed counts. probs: ``[K]`` expected probabilities (sum 1).

    Returns:
        ``(statistic, p_value)``.

    Raises:
        ValueError: A category has zero expected probability (drop it first).
    """
    if (probs <= 0).any():
        raise ValueError("every category needs an expected probability > 0")
    n = counts.double().sum()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(counts.numel() - 1), dtype=torch.float64)
    p_value = torch.special.gammaincc(dof / 2, stat / 2)
    return float(stat), float(p_value)
