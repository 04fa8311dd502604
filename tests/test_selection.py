"""Selection rules of rejection sampling against hand-computed values, and the acceptance
rule against a chi-square goodness-of-fit test on a toy discrete proposal and target."""

from __future__ import annotations

import math

import pytest
import torch

from rlft_ray.algorithms.selection import (
    accept_mask,
    best_of_n_mask,
    chi_square_test,
    estimate_log_m,
    quantile_mask,
    ratio_log_acceptance,
    threshold_mask,
    tilted_log_acceptance,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_best_of_n_keeps_the_top_k_of_each_group() -> None:
    r = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 0.0, 1.0])
    top1 = [False, True, False, False, True, False, False, False]
    top2 = [False, True, True, False, True, False, False, True]
    assert best_of_n_mask(r, 4, 1, _gen()).tolist() == top1
    assert best_of_n_mask(r, 4, 2, _gen()).tolist() == top2
    assert best_of_n_mask(r, 4, 9, _gen()).all()  # k >= N keeps everything
    with pytest.raises(ValueError, match="k >= 1"):
        best_of_n_mask(r, 4, 0)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        best_of_n_mask(r, 3, 1)


def test_best_of_n_ties_are_broken_by_a_seeded_fair_rule() -> None:
    r = torch.ones(4)  # one group, all tied
    picks = [int(best_of_n_mask(r, 4, 1, _gen(s)).nonzero()) for s in range(400)]
    assert picks == [int(best_of_n_mask(r, 4, 1, _gen(s)).nonzero()) for s in range(400)]
    counts = torch.bincount(torch.tensor(picks), minlength=4)
    assert counts.min() > 70, counts  # each of the 4 tied samples wins about 100 times
    # a tie below the winner does not matter: the strict best always wins
    assert best_of_n_mask(torch.tensor([1.0, 1.0, 3.0]), 3, 1, _gen(5)).tolist() == [
        False,
        False,
        True,
    ]


def test_threshold_and_quantile() -> None:
    r = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.2, 0.7])
    assert threshold_mask(r, 0.5).tolist() == [False, True, True, True, False, True]
    # top ceil(0.5 * 6) = 3 of the batch
    assert quantile_mask(r, 0.5, generator=_gen()).tolist() == [
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    # per group of 3: ceil(0.34 * 3) = 2 each
    assert quantile_mask(r, 0.34, group_size=3, generator=_gen()).tolist() == [
        False,
        True,
        True,
        True,
        False,
        True,
    ]
    assert quantile_mask(r, 0.01, generator=_gen()).sum() == 1  # at least one is kept
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        quantile_mask(r, 1.5)


def test_tilted_acceptance_equals_exp_of_reward_gap_over_beta() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 1.5])
    log_a = tilted_log_acceptance(r, beta=0.5, reward_max=1.0)
    assert log_a.tolist() == pytest.approx([0.0, -2.0, -1.0, 0.0])  # 1.5 > r_max is clipped
    with pytest.raises(ValueError, match="beta must be > 0"):
        tilted_log_acceptance(r, beta=0.0, reward_max=1.0)


def test_ratio_acceptance_clips_and_flags_ratios_above_m() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    logq = torch.tensor([-2.0, -2.0, -3.0])
    log_a, clipped = ratio_log_acceptance(logp, logq, log_m=1.5)
    # log p - log q - log M = [-0.5, -1.5, 1.0] -> clipped at 0
    assert log_a.tolist() == pytest.approx([-0.5, -1.5, 0.0])
    assert clipped.tolist() == [False, False, True]
    assert estimate_log_m(logp, logq) == pytest.approx(2.5)


def test_chi_square_matches_a_hand_computed_value() -> None:
    # O = [10, 20, 30], E = [20, 20, 20]: X^2 = 100/20 + 0 + 100/20 = 10, dof 2: p = exp(-5)
    stat, p = chi_square_test(torch.tensor([10.0, 20.0, 30.0]), torch.tensor([1 / 3] * 3))
    assert stat == pytest.approx(10.0)
    assert p == pytest.approx(math.exp(-5.0), rel=1e-6)


# A toy discrete proposal q and target p over 6 outcomes; M = max p/q.
Q = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.10, 0.05], dtype=torch.float64)
P = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30], dtype=torch.float64)
LOG_M = float((P / Q).log().max())  # log 6


def _rejection_sample(rule: str, n: int = 60_000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Histogram of accepted outcomes and the acceptance rate under a rule."""
    gen = _gen(seed)
    c = torch.multinomial(Q, n, replacement=True, generator=gen)
    logp, logq = P.log()[c], Q.log()[c]
    if rule == "correct":
        log_a, _ = ratio_log_acceptance(logp, logq, LOG_M)
    elif rule == "no_m":  # forgets M: min(1, p/q)
        log_a, _ = ratio_log_acceptance(logp, logq, 0.0)
    else:  # "unclipped": p / q without M or clipping, read as a probability
        log_a = logp - logq
    keep = accept_mask(log_a, gen)
    return torch.bincount(c[keep], minlength=6).double(), float(keep.double().mean())


def test_accepted_samples_follow_the_target_and_accept_at_one_over_m() -> None:
    counts, rate = _rejection_sample("correct")
    _, p_value = chi_square_test(counts, P)
    assert p_value > 0.01, p_value
    # acceptance rate 1/M = 1/6: binomial std with n = 60000 is 0.0015, allow 3 std
    assert rate == pytest.approx(1 / 6, abs=0.0045)


@pytest.mark.parametrize("rule", ["no_m", "unclipped"])
def test_a_wrong_acceptance_rule_fails_the_same_test(rule: str) -> None:
    counts, _ = _rejection_sample(rule)
    _, p_value = chi_square_test(counts, P)
    assert p_value < 0.01, p_value


def test_tilted_acceptance_samples_the_tilted_target() -> None:
    # rewards per outcome, beta: the target is p ∝ q exp(r / beta), with r_max the true bound
    r = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    beta = 0.25
    target = Q * torch.exp(r / beta)
    target /= target.sum()
    gen = _gen(1)
    c = torch.multinomial(Q, 60_000, replacement=True, generator=gen)
    keep = accept_mask(tilted_log_acceptance(r[c], beta, reward_max=1.0), gen)
    _, p_value = chi_square_test(torch.bincount(c[keep], minlength=6).double(), target)
    assert p_value > 0.01, p_value


@pytest.mark.parametrize(("fraction", "n", "kept"), [(0.14, 50, 7), (0.28, 25, 7), (0.07, 100, 7)])
def test_quantile_count_is_exact_for_decimal_fractions(fraction: float, n: int, kept: int) -> None:
    # fraction * n is 7.000000000000001 in floating point; ceil of the exact 7 is 7
    r = torch.arange(n, dtype=torch.float64)
    mask = quantile_mask(r, fraction, generator=_gen())
    assert int(mask.sum()) == kept
    assert mask[-kept:].all()  # the highest rewards
    assert int(quantile_mask(r, 0.141, generator=_gen()).sum()) == math.ceil(0.141 * n)


def test_every_selection_rule_refuses_nan_rewards_naming_the_sample() -> None:
    # ranked first by a descending sort, a NaN reward would be kept as the best sample
    r = torch.tensor([0.5, math.nan, 0.9, 0.1])
    with pytest.raises(ValueError, match=r"reward of sample 1 is nan"):
        best_of_n_mask(r, 4, 1, _gen())
    with pytest.raises(ValueError, match=r"reward of sample 1 is nan"):
        quantile_mask(r, 0.25, generator=_gen())
    with pytest.raises(ValueError, match=r"reward of sample 1 is nan"):
        quantile_mask(r, 0.5, group_size=2, generator=_gen())
    with pytest.raises(ValueError, match=r"reward of sample 1 is nan"):
        threshold_mask(r, 0.0)
    with pytest.raises(ValueError, match=r"reward of sample 1 is nan"):
        tilted_log_acceptance(r, beta=0.5, reward_max=1.0)
    logq = torch.zeros(4)
    with pytest.raises(ValueError, match=r"target log-prob of sample 1 is nan"):
        ratio_log_acceptance(r.log(), logq, 0.0)
    with pytest.raises(ValueError, match=r"proposal log-prob of sample 1 is nan"):
        ratio_log_acceptance(logq, r, 0.0)
    with pytest.raises(ValueError, match=r"target log-prob of sample 1 is nan"):
        estimate_log_m(r, logq)
    # -inf log-probabilities (impossible under the target) are valid: never accepted
    log_a, _ = ratio_log_acceptance(torch.tensor([-math.inf, 0.0]), torch.zeros(2), 0.0)
    assert log_a.tolist() == [-math.inf, 0.0]
