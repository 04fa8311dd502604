"""The GRPO family for causal LMs: GRPO, DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE, REINFORCE++.

One update per batch of ``lm.prompts_per_iteration`` prompts x ``lm.num_samples``
completions: sequence rewards (plus DAPO's overlong penalty; minus ``kl_coef`` x summed KL
when ``kl_in=reward``) become advantages by the configured estimator (REINFORCE++: token
returns whitened over the global batch), broadcast over each completion's tokens in a
PPO-clipped surrogate (GSPO: clipped on the sequence ratio), plus ``kl_coef`` x
KL(pi || pi_ref) in the loss when ``kl_in=loss`` (GRPO; Shao et al. 2024). DAPO's dynamic
sampling fills the batch before it gets here (:mod:`rlft_ray.rollout.dynamic_sampling`).

On multi-turn agent episodes (an ``env`` text environment) a row is an episode, its
reward the sum of its turn rewards, its group the episodes from one reset seed; the
sequence advantage is broadcast over the model's tokens only (the batch's loss mask).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlft_ray.algorithms.lm import (
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    ppo_token_policy_losses,
)
from rlft_ray.algorithms.policy_gradient import (
    gspo_sequence_policy_losses,
    overlong_reward_penalty,
    reinforce_pp_advantages,
)
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import all_reduce_mean, global_max, global_sum
from rlft_ray.learners.lm_batches import agent_metrics
from rlft_ray.learners.lm_learner import LMLearnerHooks
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.sampler_gap import InlineMismatch, sampler_mismatch
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.types import GenerationBatch

#: Estimators whose advantages are per token (returns whitened over the global batch).
REINFORCE_PP = ("reinforce_pp", "reinforce_pp_baseline")


class GRPOLearner(LMLearnerHooks, Learner):
    """The GRPO family (``grpo.estimator``, ``grpo.ratio_level``, ...) on one rank; DDP
    across ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.grpo
        self.core = LMRank(
            cfg,
            ctx,
            self.hp,
            keep_start=self.hp.kl_coef > 0 or cfg.lm.track_kl,
            reference_reported_only=self.hp.kl_coef == 0,
        )
        self.optimizer = self.core.optimizer

    # -- class-level hooks -----------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        hp, lm = cfg.grpo, cfg.lm
        if hp.estimator in ("rloo", "reinforce_pp_baseline") and lm.num_samples < 2:
            raise ConfigError(
                "lm.num_samples",
                f"grpo.estimator={hp.estimator} needs at least 2 completions per prompt",
            )
        if hp.dynamic_sampling and lm.num_samples < 2:
            raise ConfigError(
                "lm.num_samples",
                "grpo.dynamic_sampling drops groups of equal rewards: a group of 1 always is one",
            )
        if hp.overlong_buffer > lm.max_new_tokens:
            raise ConfigError(
                "grpo.overlong_buffer",
                f"{hp.overlong_buffer} is longer than lm.max_new_tokens={lm.max_new_tokens}",
            )
        if hp.ratio_level == "sequence" and hp.estimator in REINFORCE_PP:
            raise ConfigError(
                "grpo.ratio_level",
                f"sequence (GSPO) needs one advantage per completion; {hp.estimator} gives one "
                "per token",
            )
        return super().probe(cfg)

    @classmethod
    def resample_rounds(cls, cfg: RunConfig) -> int | None:
        """DAPO's dynamic sampling: extra sampling rounds allowed (None: no filtering)."""
        return cfg.grpo.max_resample_rounds if cfg.grpo.dynamic_sampling else None

    # -- learning ------------------------------------------------------------------------------
    def advantages(
        self,
        scores: torch.Tensor,
        group_size: int,
        mask: torch.Tensor,
        kl: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[B]`` sequence advantages (``[B, L]`` token ones for REINFORCE++); REINFORCE's
        baseline and REINFORCE++'s whitening are over all ranks."""
        hp = self.hp
        if hp.estimator == "reinforce":
            return scores - all_reduce_mean(scores.float().mean(), self.ctx)
        if hp.estimator in REINFORCE_PP:
            token_kl = kl if hp.kl_in == "reward" and hp.kl_coef > 0 else None
            return reinforce_pp_advantages(
                scores,
                mask,
                token_kl,
                hp.kl_coef,
                group_size,
                baseline=hp.estimator == "reinforce_pp_baseline",
                reduce=lambda moments: global_sum(moments, self.ctx),
            )
        return group_advantages(scores, group_size, hp.estimator, std_normalize=hp.std_normalize)

    def shaped_scores(
        self, tensors: dict[str, torch.Tensor], kl: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``[B]`` rewards the advantages start from: plus DAPO's overlong penalty, minus
        the summed KL with ``kl_in=reward`` (REINFORCE++ takes the KL per token instead)."""
        hp = self.hp
        scores = tensors["rewards"].float()
        metrics: dict[str, float] = {}
        if hp.overlong_buffer > 0:
            lengths = tensors["mask"].float().sum(-1)
            penalty = overlong_reward_penalty(
                lengths, self.cfg.lm.max_new_tokens, hp.overlong_buffer, hp.overlong_penalty
            )
            scores = scores + penalty
            metrics["reward/overlong_penalty_mean"] = float(
                all_reduce_mean(penalty.mean(), self.ctx)
            )
        kl_per_seq = hp.kl_in == "reward" and hp.estimator not in REINFORCE_PP
        if kl_per_seq and kl is not None and hp.kl_coef > 0:
            scores = scores - hp.kl_coef * masked_sum(kl, tensors["mask"], dim=-1)
        return scores, metrics

    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        tensors = core.tensors(batch)
        tensors.update(core.score_pass(tensors, kl_in_objective=hp.kl_coef > 0))
        kl, metrics = core.kl_metrics(tensors, hp.kl_estimator)
        scores, shaping = self.shaped_scores(tensors, kl)
        metrics.update(shaping)
        tensors["advantages"] = self.advantages(scores, batch.group_size, tensors["mask"], kl)
        kl_in_loss = hp.kl_in == "loss" and hp.kl_coef > 0
        sequence_ratio = hp.ratio_level == "sequence"
        active = update_rows(tensors["advantages"], tensors["mask"], kl_in_loss)
        inline = None  # pi_learner before the update, on the rows it runs (sampler_gap)
        if core.recomputes_logprobs(hp.tis_cap):
            if core.single_step():  # from the update's own forward
                inline = InlineMismatch(hp.tis_cap, self.ctx)
            else:  # a pass first: later steps move the weights
                tensors.update(core.learner_logprob_pass(tensors, active))
                metrics.update(sampler_mismatch(tensors, hp.tis_cap, self.ctx, active))

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            base = sub.get("ratio_logprobs", sub["old_logprobs"])  # TIS: the learner's
            if inline is not None:
                learner = inline.observe(out.logprobs, sub)  # the gap (and TIS weights)
                if hp.tis_cap is not None:  # without TIS the ratio stays on the sampler's
                    base = learner
            if sequence_ratio:  # GSPO
                loss, stats = gspo_sequence_policy_losses(
                    out.logprobs, base, sub["advantages"], sub["mask"], hp.clip_low, hp.clip_high
                )
            else:
                loss, stats = ppo_token_policy_losses(
                    out.logprobs, base, sub["advantages"], hp.clip_low, hp.clip_high
                )
            if "tis" in sub:  # the tokens came from the sampler's distribution
                loss = loss * sub["tis"]
            stats["policy"] = loss.detach()
            if kl_in_loss:
                kl_tok = kl_penalty(out.logprobs, sub["ref_logprobs"], hp.kl_estimator)
                stats["kl"] = kl_tok.detach()
                loss = loss + hp.kl_coef * kl_tok
            return loss, stats

        metrics.update(core.optimize(tensors, token_loss, progress, active))
        if inline is not None:
            metrics.update(inline.metrics())
        if active is not None:
            metrics["optim/skipped_rows_frac"] = float(
                all_reduce_mean((~active).float().mean(), self.ctx)
            )
        metrics.update(core.reward_metrics(tensors, batch.group_size))
        metrics.update(dynamic_sampling_metrics(batch, self.ctx))
        metrics.update(agent_metrics(batch, self.ctx))  # multi-turn: turns, tools, truncation
        adv = tensors["advantages"].abs()  # [B], or [B, L] for REINFORCE++ (real tokens only)
        adv_mean = masked_mean(adv, tensors["mask"]) if adv.dim() == 2 else adv.mean()
        metrics["adv/abs_mean"] = float(all_reduce_mean(adv_mean, self.ctx))
        return metrics


def update_rows(
    advantages: torch.Tensor, mask: torch.Tensor, kl_in_loss: bool
) -> torch.Tensor | None:
    """``[B]`` bool: the rows an update has to run, or None for all of them.

    Without a KL term in the loss, a row whose advantage is exactly zero on every real
    token (a GRPO / RLOO / Dr. GRPO group whose answers all scored the same) has a loss of
    exactly zero whatever its ratio (clipped or not, TIS-weighted or not), hence a zero
    gradient: the update skips its forward and backward and keeps it in the loss
    denominator, so the gradient is the same. On the chat example two thirds of the
    groups are flat. (DAPO's dynamic sampling drops such groups before the update and
    resamples; this keeps the objective as written.) With the KL in the loss every row
    has a gradient.

    Args:
        advantages: ``[B]`` sequence or ``[B, L]`` token advantages.
        mask: ``[B, L]`` real completion tokens.
        kl_in_loss: Whether the loss has a KL term.
    """
    if kl_in_loss:
        return None
    if advantages.dim() == 2:
        return (advantages.masked_fill(mask == 0, 0) != 0).any(-1)
    return advantages != 0


def dynamic_sampling_metrics(batch: GenerationBatch, ctx: LearnerContext) -> dict[str, float]:
    """With dynamic sampling: ``rollout/filtered_groups`` (groups of equal rewards dropped),
    ``rollout/extra_samples`` (completions of the extra rounds), ``rollout/resample_rounds``
    (the most any rank took), summed over ranks; ``reward/mean`` and ``reward/std`` over every
    generated completion (what the policy earns) and ``reward/kept_mean`` over the trained ones."""
    sel = batch.selection
    if sel is None:
        return {}
    rewards = sel.rewards.astype(np.float64)
    kept = rewards[sel.accepted]
    local = torch.tensor(
        [
            batch.filtered_groups,
            batch.extra_samples,
            rewards.sum(),
            (rewards**2).sum(),
            len(rewards),
            kept.sum(),
            len(kept),
        ],
        dtype=torch.float64,
        device=ctx.device,
    )
    filtered, extra, total, sq, n, kept_sum, kept_n = global_sum(local, ctx).tolist()
    rounds = global_max(torch.tensor(float(batch.resample_rounds), device=ctx.device), ctx)
    mean = total / max(n, 1.0)
    return {
        "rollout/filtered_groups": filtered,
        "rollout/extra_samples": extra,
        "rollout/resample_rounds": float(rounds),
        "reward/mean": mean,
        "reward/std": math.sqrt(max(sq / max(n, 1.0) - mean * mean, 0.0)),
        "reward/kept_mean": kept_sum / max(kept_n, 1.0),
    }
