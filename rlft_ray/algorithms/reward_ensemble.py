"""Defences of a learned reward against over-optimisation: ensembles and clipping."""

from __future__ import annotations

import torch


def ensemble_reward(member_scores: torch.Tensor, std_coef: float) -> torch.Tensor:
    """Conservative reward of a reward-model ensemble: the members' mean minus ``std_coef``
    times their spread.

    Uncertainty-weighted optimisation (Coste et al. 2023, "Reward Model Ensembles Help
    Mitigate Overoptimization", UWO; Eisenstein et al. 2023, "Helping or Herding?"): with
    the N members' scores r_1..r_N of one completion::

        mean = (1 / N) sum_i r_i
        std  = sqrt((1 / N) sum_i (r_i - mean)^2)        (population std: 0 for N = 1)
        r    = mean - k * std

    Where the members disagree (a completion off the pairs' distribution, which the policy
    found by gaming one of them), the reward is lowered.

    Args:
        member_scores: ``[N, B]`` score of each of the N members for each of B completions.
        std_coef: k >= 0 (0: the plain mean).

    Returns:
        ``[B]`` float32 rewards.
    """
    if member_scores.dim() != 2 or member_scores.shape[0] < 1:
        raise ValueError(f"member_scores must be [N >= 1, B], got {tuple(member_scores.shape)}")
    if std_coef < 0:
        raise ValueError(f"std_coef must be >= 0, got {std_coef}")
    scores = member_scores.double()
    mean = scores.mean(0)
    std = scores.std(0, correction=0)
    return (mean - std_coef * std).float()


def clip_reward(rewards: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Rewards clipped to ``[-bound, bound]`` (None: unchanged).

    Bounding the learned reward caps what an exploit of the reward model can earn, the
    reward clipping of Mnih et al. 2015 applied to a learned reward (as OpenRLHF's
    ``reward_clip_range``)::

        r' = min(max(r, -bound), bound)

    Args:
        rewards: ``[B]`` rewards.
        bound: c > 0, or None.

    Returns:
        ``[B]`` tensor of ``rewards``' dtype.
    """
    if bound is None:
        return rewards
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    return rewards.clamp(-bound, bound)
