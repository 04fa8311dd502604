"""Token-level PPO for causal LMs: value head, GAE over completion tokens, KL in the reward.

Per-token reward ``-kl_coef * KL_t`` plus the sequence score on the last token
(Ziegler et al. 2019; Ouyang et al. 2022); GAE with a value head on the policy's
last hidden state; clipped surrogate and clipped value loss over ``num_epochs``.

On multi-turn agent episodes each turn's reward sits on the turn's last model token and
GAE runs over the model's tokens only (:func:`~rlft_ray.algorithms.lm.gapped_gae`: the
value after a turn's last token is the one at the next turn's first token).
"""

from __future__ import annotations

import torch

from rlft_ray.algorithms.lm import (
    gapped_gae,
    masked_gae,
    masked_mean,
    ppo_token_policy_losses,
    ppo_token_value_losses,
    token_rewards,
)
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces
from rlft_ray.learners.ddp import all_reduce_mean, global_masked_whiten
from rlft_ray.learners.lm_batches import agent_metrics
from rlft_ray.learners.lm_learner import LMLearnerHooks
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.sampler_gap import sampler_mismatch
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.types import GenerationBatch


class LMPPOLearner(LMLearnerHooks, Learner):
    """PPO with a value head on one rank; DDP across ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.lm_ppo
        self.core = LMRank(
            cfg,
            ctx,
            self.hp,
            keep_start=self.hp.kl_coef > 0 or cfg.lm.track_kl,
            reference_reported_only=self.hp.kl_coef == 0,
            value_head=True,
            value_head_init_std=self.hp.value_head_init_std,
        )
        self.optimizer = self.core.optimizer

    # -- learning ------------------------------------------------------------------------------
    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        tensors = core.tensors(batch)
        tensors.update(
            core.score_pass(
                tensors,
                values=True,
                kl_in_objective=hp.kl_coef > 0,
                learner_logprobs=core.recomputes_logprobs(hp.tis_cap),
            )
        )
        kl, metrics = core.kl_metrics(tensors, hp.kl_estimator)
        metrics.update(sampler_mismatch(tensors, hp.tis_cap, self.ctx))
        if "step_rewards" in tensors:  # multi-turn: each turn's reward on its last token
            rewards = (
                token_rewards(
                    torch.zeros_like(tensors["rewards"]),
                    kl if hp.kl_coef > 0 else None,
                    tensors["mask"],
                    hp.kl_coef,
                )
                + tensors["step_rewards"] * tensors["mask"]
            )
        else:
            scores = tensors["rewards"]
            if hp.whiten_rewards:  # [B] scores standardised over every rank's sequences
                ones = torch.ones_like(scores, dtype=torch.bool).unsqueeze(1)
                scores = global_masked_whiten(scores.unsqueeze(1), ones, self.ctx).squeeze(1)
            rewards = token_rewards(
                scores, kl if hp.kl_coef > 0 else None, tensors["mask"], hp.kl_coef
            )
        # multi-turn: over the model's tokens, the env's replies between them skipped
        gae = gapped_gae if "attn_mask" in tensors else masked_gae
        advantages, returns = gae(
            rewards, tensors["old_values"], tensors["mask"], hp.gamma, hp.gae_lambda
        )
        if hp.whiten_advantages:
            advantages = global_masked_whiten(advantages, tensors["mask"], self.ctx)
        tensors["advantages"], tensors["returns"] = advantages, returns

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            base = sub.get("ratio_logprobs", sub["old_logprobs"])  # TIS: the learner's
            pg, stats = ppo_token_policy_losses(
                out.logprobs, base, sub["advantages"], hp.clip_low, hp.clip_high
            )
            if "tis" in sub:  # the tokens came from the sampler's distribution
                pg = pg * sub["tis"]
            vf = ppo_token_value_losses(
                out.values, sub["old_values"], sub["returns"], hp.value_clip
            )
            stats.update(policy=pg.detach(), value=vf.detach())
            return pg + hp.vf_coef * vf, stats

        metrics.update(core.optimize(tensors, token_loss, progress))
        metrics.update(core.reward_metrics(tensors, batch.group_size))
        metrics.update(agent_metrics(batch, self.ctx))  # multi-turn: turns, tools, truncation
        mask = tensors["mask"]
        resid = masked_mean((returns - tensors["old_values"]) ** 2, mask)
        var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        ev = torch.where(var > 0, 1.0 - resid / var.clamp_min(1e-12), torch.zeros_like(var))
        stats = all_reduce_mean(
            torch.stack([ev, masked_mean(tensors["old_values"], mask)]), self.ctx
        )
        metrics["value/explained_variance"], metrics["value/mean"] = stats.tolist()
        return metrics
