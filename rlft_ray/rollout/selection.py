"""The selection stage of rejection sampling, as it runs on a generation actor.

:class:`Selector` applies the ``rsft`` section's rule (pure functions of
:mod:`rlft_ray.algorithms.selection`) to one batch of generated samples and keeps the
state a rule needs across batches: the seeded generator, the running reward maximum
of tilted acceptance and the log M estimated from the warm-up batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from rlft_ray.algorithms.selection import (
    accept_mask,
    best_of_n_mask,
    estimate_log_m,
    quantile_mask,
    ratio_log_acceptance,
    threshold_mask,
    tilted_log_acceptance,
)
from rlft_ray.config import RSFTConfig


@dataclass(frozen=True)
class Selected:
    """A selection's outcome for B samples.

    Attributes:
        keep: ``[B]`` bool, the accepted samples.
        clipped: Samples whose acceptance probability was clipped to 1 (acceptance only).
        bound: log M or r_max in use (acceptance only), else None.
    """

    keep: np.ndarray
    clipped: int = 0
    bound: float | None = None


class Selector:
    """Applies one selection rule to batches of samples.

    Args:
        cfg: The ``rsft`` section (rule and its parameters, ``min_reward``).
        seed: Seeds tie breaks and acceptance draws.
    """

    def __init__(self, cfg: RSFTConfig, seed: int) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.running_max = -math.inf
        self.log_m = cfg.log_m
        rules: dict[str, Callable[..., Selected]] = {
            "all": self._all,
            "best_of_n": self._best_of_n,
            "threshold": self._threshold,
            "quantile": self._quantile,
            "acceptance": self._acceptance,
        }
        self._rule = rules[cfg.select]

    @property
    def needs_target(self) -> bool:
        """Whether the rule needs the target model's log-probabilities of each sample."""
        return self.cfg.select == "acceptance" and self.cfg.target_model is not None

    def __call__(
        self,
        rewards: np.ndarray,
        group_size: int,
        proposal_logp: np.ndarray | None = None,
        target_logp: np.ndarray | None = None,
    ) -> Selected:
        """Select among ``[B]`` samples (groups of ``group_size`` contiguous rows).

        Args:
            rewards: ``[B]`` rewards.
            group_size: Completions per prompt.
            proposal_logp: ``[B]`` log q(c), summed over tokens (target acceptance).
            target_logp: ``[B]`` log p(c) under the target model (target acceptance).
        """
        r = torch.as_tensor(np.asarray(rewards), dtype=torch.float64)
        out = self._rule(r, group_size, proposal_logp, target_logp)
        if self.cfg.min_reward is not None:
            keep = out.keep & (np.asarray(rewards) >= self.cfg.min_reward)
            out = Selected(keep, out.clipped, out.bound)
        return out

    # -- the rules ------------------------------------------------------------------------
    def _all(self, r: torch.Tensor, *_: object) -> Selected:
        return Selected(np.ones(r.shape[0], dtype=bool))

    def _best_of_n(self, r: torch.Tensor, group_size: int, *_: object) -> Selected:
        return Selected(best_of_n_mask(r, group_size, self.cfg.top_k, self.generator).numpy())

    def _threshold(self, r: torch.Tensor, *_: object) -> Selected:
        return Selected(threshold_mask(r, self.cfg.threshold).numpy())

    def _quantile(self, r: torch.Tensor, group_size: int, *_: object) -> Selected:
        per = group_size if self.cfg.quantile_per_group else None
        return Selected(quantile_mask(r, self.cfg.quantile, per, self.generator).numpy())

    def _acceptance(
        self,
        r: torch.Tensor,
        group_size: int,
        proposal_logp: np.ndarray | None,
        target_logp: np.ndarray | None,
    ) -> Selected:
        if self.needs_target:
            if target_logp is None or proposal_logp is None:
                raise ValueError("target-model acceptance needs proposal and target log-probs")
            logp = torch.as_tensor(target_logp, dtype=torch.float64)
            logq = torch.as_tensor(proposal_logp, dtype=torch.float64)
            if self.log_m is None and len(logp):  # the warm-up batch sets log M
                self.log_m = estimate_log_m(logp, logq)
            log_a, clipped = ratio_log_acceptance(logp, logq, self.log_m or 0.0)
            keep = accept_mask(log_a, self.generator)
            return Selected(keep.numpy(), int(clipped.sum()), self.log_m)
        bound = self.cfg.reward_max
        if bound is None:
            # Approximate: the running maximum of the rewards seen so far (on this actor; a
            # restarted actor starts again). Samples above the previous maximum would have
            # been clipped under it: count them, then raise the bound.
            previous = self.running_max
            if len(r):
                self.running_max = max(previous, float(r.max()))
            bound = self.running_max
            clipped = int((r > previous).sum()) if math.isfinite(previous) else 0
        else:
            clipped = int((r > bound).sum())
        if not math.isfinite(bound):  # nothing seen yet
            return Selected(np.zeros(r.shape[0], dtype=bool))
        log_a = tilted_log_acceptance(r, self.cfg.beta, bound)
        keep = accept_mask(log_a, self.generator)
        return Selected(keep.numpy(), clipped, bound)
