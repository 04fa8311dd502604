"""GRPO, RLOO and REINFORCE for causal LMs: critic-free, with group/batch baselines.

One update per batch of ``lm.prompts_per_iteration`` prompts x ``lm.num_samples``
completions: sequence rewards (minus ``kl_coef`` x summed KL when ``kl_in=reward``)
become advantages by the configured estimator, broadcast over each completion's
tokens in a PPO-clipped surrogate, plus ``kl_coef`` x KL(pi || pi_ref) in the loss
when ``kl_in=loss`` (GRPO; Shao et al. 2024).

On multi-turn agent episodes (an ``env`` text environment) a row is an episode, its
reward the sum of its turn rewards, its group the episodes from one reset seed; the
sequence advantage is broadcast over the model's tokens only (the batch's loss mask).
"""

from __future__ import annotations

import torch

from rlft_ray.algorithms.lm import group_advantages, kl_penalty, masked_sum, ppo_token_policy_losses
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import all_reduce_mean
from rlft_ray.learners.lm_learner import LMLearnerHooks
from rlft_ray.learners.lm_rank import LMRank, agent_metrics
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.types import GenerationBatch


class GRPOLearner(LMLearnerHooks, Learner):
    """GRPO / RLOO / REINFORCE (``grpo.estimator``) on one rank; DDP across ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.grpo
        self.core = LMRank(cfg, ctx, self.hp, keep_start=self.hp.kl_coef > 0 or cfg.lm.track_kl)
        self.optimizer = self.core.optimizer

    # -- class-level hooks -----------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        if cfg.grpo.estimator == "rloo" and cfg.lm.num_samples < 2:
            raise ConfigError(
                "lm.num_samples", "grpo.estimator=rloo needs at least 2 completions per prompt"
            )
        return super().probe(cfg)

    # -- learning ------------------------------------------------------------------------------
    def advantages(self, scores: torch.Tensor, group_size: int) -> torch.Tensor:
        """``[B]`` sequence advantages; REINFORCE's baseline is the mean over all ranks."""
        if self.hp.estimator == "reinforce":
            return scores - all_reduce_mean(scores.float().mean(), self.ctx)
        return group_advantages(
            scores, group_size, self.hp.estimator, std_normalize=self.hp.std_normalize
        )

    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        tensors = core.tensors(batch)
        tensors.update(
            core.score_pass(
                tensors,
                kl_in_objective=hp.kl_coef > 0,
                learner_logprobs=core.recomputes_logprobs(hp.tis_cap),
            )
        )
        kl, metrics = core.kl_metrics(tensors, hp.kl_estimator)
        metrics.update(core.sampler_mismatch(tensors, hp.tis_cap))
        scores = tensors["rewards"].float()
        if hp.kl_in == "reward" and kl is not None and hp.kl_coef > 0:
            scores = scores - hp.kl_coef * masked_sum(kl, tensors["mask"], dim=-1)
        tensors["advantages"] = self.advantages(scores, batch.group_size)
        kl_in_loss = hp.kl_in == "loss" and hp.kl_coef > 0

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            base = sub.get("ratio_logprobs", sub["old_logprobs"])  # TIS: the learner's
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

        metrics.update(core.optimize(tensors, token_loss, progress))
        metrics.update(core.reward_metrics(tensors, batch.group_size))
        metrics.update(agent_metrics(batch, self.ctx))  # multi-turn: turns, tools, truncation
        metrics["adv/abs_mean"] = float(
            all_reduce_mean(tensors["advantages"].abs().mean(), self.ctx)
        )
        return metrics
