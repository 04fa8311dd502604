"""Reference-free preference learners from ``lm.pairs``: SimPO and ORPO.

They walk the pairs as offline DPO does (:mod:`rlft_ray.learners.dpo`: one optimizer step
per ``batch_size`` pairs, micro-batched, DDP across ranks, chosen and rejected in one
forward with the prompt shared) but hold one model: no reference is kept, loaded or
precomputed. Both compare length-normalised log-probs (mean over a completion's
tokens). Metrics use TRL's names (``rewards/*``, ``logps/*``) plus ``loss/simpo`` or
``loss/orpo``, ``loss/sft``, ``loss/odds_ratio`` and ``log_odds_ratio``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from rlft_ray.algorithms import orpo_losses, simpo_losses
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import CurvePlot, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.engine import Steps
from rlft_ray.learners.lm_learner import LMLearnerHooks, check_reward_fns, heldout_tables
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.pairwise import pair_stream, pair_update, probe_pairs
from rlft_ray.lm.pairs import pair_batch, pair_tensors
from rlft_ray.lm.policy import pair_logps
from rlft_ray.types import PairBatch


def _reward_stats(
    loss_key: str, losses: torch.Tensor, rew_c: torch.Tensor, rew_r: torch.Tensor, c, r
) -> dict[str, torch.Tensor]:
    return {
        loss_key: losses.detach(),
        "rewards/chosen": rew_c,
        "rewards/rejected": rew_r,
        "rewards/accuracies": (rew_c > rew_r).float(),
        "rewards/margins": rew_c - rew_r,
        "logps/chosen": c.detach(),
        "logps/rejected": r.detach(),
    }


def simpo_pair_loss(
    net: torch.nn.Module, sub: dict[str, torch.Tensor], weight: torch.Tensor, hp: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO's weighted loss of a micro-batch of pairs, summed (plus CPO-SimPO's NLL term)."""
    c, r, nll = pair_logps(net, sub, average=True)
    losses, rew_c, rew_r = simpo_losses(c, r, hp.beta, hp.gamma, hp.label_smoothing)
    total = (losses * weight).sum() + hp.sft_coef * (nll * weight).sum()
    stats = _reward_stats("loss/simpo", losses, rew_c, rew_r, c, r)
    if hp.sft_coef:
        stats["loss/sft"] = nll.detach()
    return total, stats


def orpo_pair_loss(
    net: torch.nn.Module, sub: dict[str, torch.Tensor], weight: torch.Tensor, hp: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's weighted loss of a micro-batch of pairs, summed; rewards as TRL logs them
    (lambda times the mean log-probs)."""
    c, r, nll = pair_logps(net, sub, average=True)
    losses, or_losses, log_odds = orpo_losses(c, r, nll, hp.lambda_or)
    stats = _reward_stats(
        "loss/orpo", losses, hp.lambda_or * c.detach(), hp.lambda_or * r.detach(), c, r
    )
    stats.update(
        {"loss/sft": nll.detach(), "loss/odds_ratio": or_losses, "log_odds_ratio": log_odds}
    )
    return (losses * weight).sum(), stats


class RefFreePairLearner(LMLearnerHooks, Learner):
    """A pair learner without a reference model; subclasses name the loss."""

    scores_samples: ClassVar[bool] = False
    score_metric: ClassVar[str] = "rewards/accuracies"

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.algo_config
        self.core = LMRank(cfg, ctx, self.hp, keep_start=False, temperature=1.0)
        self.optimizer = self.core.optimizer
        self.pairs = pair_stream(ctx, self.hp, cfg.seed)

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        check_reward_fns(cfg)  # lm.eval_fn scores the held-out evaluation
        hp = cfg.algo_config
        return probe_pairs(cfg, hp.batch_size, hp.num_epochs, lambda tok: heldout_tables(cfg, tok))

    def rank_state(self) -> dict[str, np.ndarray]:
        return self.pairs.state()

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.pairs.load_state(state)

    def next_batch(self, version: int) -> PairBatch:
        return pair_batch(self.pairs.next_rows(), int(self.core.tokenizer.pad_token_id), version)

    def pair_loss(
        self, sub: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def update(self, batch: PairBatch, progress: float) -> dict[str, float]:
        t = pair_tensors(batch, self.ctx.device)
        steps = Steps(micro_batch_size=self.hp.micro_batch_size, unit="pairs")
        pad_id = int(self.core.tokenizer.pad_token_id)
        return pair_update(
            self.core.engine, t, self.pair_loss, pad_id=pad_id, steps=steps, progress=progress
        )


class SimPOLearner(RefFreePairLearner):
    """SimPO on one rank's pairs; DDP across ranks."""

    curve: ClassVar[CurvePlot] = CurvePlot("loss/simpo", "counters/iteration", "loss_curve.png")

    def pair_loss(
        self, sub: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return simpo_pair_loss(self.core.net, sub, weight, self.hp)


class ORPOLearner(RefFreePairLearner):
    """ORPO on one rank's pairs; DDP across ranks."""

    curve: ClassVar[CurvePlot] = CurvePlot("loss/orpo", "counters/iteration", "loss_curve.png")

    def pair_loss(
        self, sub: dict[str, torch.Tensor], weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return orpo_pair_loss(self.core.net, sub, weight, self.hp)
