"""Offline DPO / IPO / cDPO / hinge from a fixed set of preference pairs (``lm.pairs``).

Each iteration is one optimizer step on ``dpo.batch_size`` pairs (each rank reads its
share from its Ray Data shard), micro-batched with gradient accumulation; chosen and
rejected completions go through one concatenated forward. The reference log-probs are
precomputed once before training (:mod:`rlft_ray.rollout.reference`: a Ray Data pass over
an actor pool, cached next to the pairs), so the learner holds one model; with
``dpo.precompute_ref: false`` a frozen copy computes them on the fly. Metrics use TRL's
names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``loss/dpo``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from rlft_ray.algorithms import dpo_losses
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import CurvePlot, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.engine import Steps
from rlft_ray.learners.lm_learner import LMLearnerHooks, check_reward_fns, heldout_tables
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.pairwise import PAIRS, pair_stream, pair_update, probe_pairs
from rlft_ray.lm.pairs import pair_batch, pair_tensors, rows_of
from rlft_ray.lm.policy import pair_logps
from rlft_ray.types import PairBatch


def preference_loss(
    net: torch.nn.Module,
    sub: dict[str, torch.Tensor],
    weight: torch.Tensor,
    loss: str,
    beta: float,
    label_smoothing: float,
    sft_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss of a micro-batch of pairs (``sub`` carries the reference log-probs).

    Returns:
        The weighted loss summed over the pairs, and per-pair statistics with TRL's names.
    """
    ipo = loss == "ipo"  # IPO compares length-normalised log-probs (as TRL does)
    policy_c, policy_r, nll = pair_logps(net, sub, average=ipo)
    ref_c, ref_r = sub["ref_chosen"], sub["ref_rejected"]
    if ipo:
        ref_c = ref_c / sub["chosen_mask"].sum(-1).clamp_min(1)
        ref_r = ref_r / sub["rejected_mask"].sum(-1).clamp_min(1)
    losses, rew_c, rew_r = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta, loss, label_smoothing)
    total = (losses * weight).sum() + sft_coef * (nll * weight).sum()
    stats = {
        "loss/dpo": losses.detach(),
        "rewards/chosen": rew_c,
        "rewards/rejected": rew_r,
        "rewards/accuracies": (rew_c > rew_r).float(),
        "rewards/margins": rew_c - rew_r,
        "logps/chosen": policy_c.detach(),
        "logps/rejected": policy_r.detach(),
    }
    if sft_coef:
        stats["loss/sft"] = nll.detach()
    return total, stats


@torch.no_grad()
def reference_logps(
    reference: torch.nn.Module, t: dict[str, torch.Tensor], micro: int
) -> dict[str, torch.Tensor]:
    """``ref_chosen`` / ``ref_rejected`` of every pair in ``t`` under a frozen reference."""
    chosen, rejected = [], []
    rows = torch.arange(t["prompt_ids"].shape[0], device=t["prompt_ids"].device)
    for idx in torch.split(rows, micro) if len(rows) else ():  # a rank may hold no pairs
        c, r, _ = pair_logps(reference, rows_of(t, idx))
        chosen.append(c)
        rejected.append(r)
    empty = torch.zeros(0, device=t["prompt_ids"].device)
    return {
        "ref_chosen": torch.cat(chosen) if chosen else empty,
        "ref_rejected": torch.cat(rejected) if rejected else empty,
    }


class DPOLearner(LMLearnerHooks, Learner):
    """DPO on one rank's pairs; DDP across ranks."""

    scores_samples: ClassVar[bool] = False
    score_metric: ClassVar[str] = "rewards/accuracies"
    curve: ClassVar[CurvePlot] = CurvePlot("loss/dpo", "counters/iteration", "loss_curve.png")

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.dpo
        # DPO's log-probs are the model's own (T = 1); the reference copy only on the fly
        self.core = LMRank(
            cfg, ctx, self.hp, keep_start=not self.hp.precompute_ref, temperature=1.0
        )
        self.optimizer = self.core.optimizer
        self.pairs = pair_stream(ctx, self.hp, cfg.seed)

    # -- class-level hooks ---------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        check_reward_fns(cfg)  # lm.eval_fn scores the held-out evaluation
        return probe_pairs(
            cfg, cfg.dpo.batch_size, cfg.dpo.num_epochs, lambda tok: heldout_tables(cfg, tok)
        )

    @classmethod
    def prepare_uses_actors(cls, cfg: RunConfig) -> bool:
        return cfg.dpo.precompute_ref

    @classmethod
    def prepare(cls, cfg: RunConfig, probe: TaskProbe, output_dir: Path) -> TaskProbe:
        """Attach the reference's log-probs to the pairs (cached; computed on actors)."""
        if not cfg.dpo.precompute_ref:
            return probe
        from rlft_ray.rollout.reference import attach_reference_logps

        res = cfg.resources
        table, info = attach_reference_logps(
            probe.datasets[PAIRS],
            reference_model(cfg),
            cfg.lm,
            actors=res.num_rollout_actors,
            cpus_per_actor=res.cpus_per_rollout_actor,
            fallback_dir=output_dir,
            bf16=res.use_gpu,  # a GPU learner's log-probs are bf16-autocast: the reference's too
            gpus_per_actor=res.gpus_per_rollout_actor if res.use_gpu else 0.0,
        )
        return dataclasses.replace(
            probe, datasets={**probe.datasets, PAIRS: table}, info={**probe.info, **info}
        )

    # -- learning --------------------------------------------------------------------------
    def rank_state(self) -> dict[str, np.ndarray]:
        return self.pairs.state()  # --resume goes on where the data stream was

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.pairs.load_state(state)

    def next_batch(self, version: int) -> PairBatch:
        return pair_batch(self.pairs.next_rows(), int(self.core.tokenizer.pad_token_id), version)

    def update(self, batch: PairBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        t = pair_tensors(batch, self.ctx.device)
        if "ref_chosen" not in t:
            t.update(reference_logps(core.reference, t, hp.micro_batch_size))

        def loss(sub: dict[str, torch.Tensor], weight: torch.Tensor) -> Any:
            return preference_loss(
                core.net, sub, weight, hp.loss, hp.beta, hp.label_smoothing, hp.sft_coef
            )

        steps = Steps(micro_batch_size=hp.micro_batch_size, unit="pairs")  # one step per batch
        pad_id = int(core.tokenizer.pad_token_id)
        return pair_update(core.engine, t, loss, pad_id=pad_id, steps=steps, progress=progress)


def reference_model(cfg: RunConfig) -> str:
    """The model the run starts from, which is DPO's reference: ``init_from``'s policy, else ``lm.model``."""
    if cfg.init_from:
        policy = Path(cfg.init_from) / "policy"
        if policy.is_dir():
            return str(policy.resolve())
    return str(cfg.lm.model)
