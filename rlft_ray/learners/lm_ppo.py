"""Token-level PPO for causal LMs: value head, GAE over completion tokens, KL in the reward.

Per-token reward ``-kl_coef * KL_t`` plus the sequence score on the last token
(Ziegler et al. 2019; Ouyang et al. 2022); GAE with a value head on the policy's
last hidden state; clipped surrogate and clipped value loss over ``num_epochs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rlft_ray.algorithms.lm import (
    masked_gae,
    masked_mean,
    ppo_token_policy_losses,
    ppo_token_value_losses,
    token_rewards,
)
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import EvalOptions, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.lm_core import (
    LMCore,
    evaluate_lm,
    global_masked_whiten,
    lm_sampler_kwargs,
    probe_lm,
)
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch


class LMPPOLearner(Learner):
    """PPO with a value head on one rank; DDP across ranks."""

    sampler_cls: ClassVar[type] = GenerationActor
    score_metric: ClassVar[str] = "reward/mean"
    curve: ClassVar[tuple[str, str, str]] = (
        "reward/mean",
        "counters/iteration",
        "reward_curve.png",
    )

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.lm_ppo
        self.core = LMCore(
            self, self.hp, value_head=True, value_head_init_std=self.hp.value_head_init_std
        )
        self.optimizer = self.core.optimizer

    # -- class-level hooks -----------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        return probe_lm(cfg)

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        return lm_sampler_kwargs(cfg, index)

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        from rlft_ray.lm.tiny import load_model_and_tokenizer

        return load_model_and_tokenizer(cfg.lm.model, cfg.lm.trust_remote_code)[0]

    @classmethod
    def evaluate(cls, checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
        return evaluate_lm(checkpoint, cfg, opts)

    # -- per-rank hooks ----------------------------------------------------------------------
    def next_sample_args(self, num_actors: int) -> list[tuple[Any, ...]]:
        return self.core.next_sample_args(num_actors)

    def policy_state(self) -> dict[str, torch.Tensor]:
        return self.core.policy_state()

    def modules(self) -> dict[str, nn.Module]:
        return self.core.modules()

    def save_extras(self, path: Path) -> None:
        self.core.save_extras(path)

    def after_init_from(self) -> None:
        self.core.reset_reference()

    # -- learning ------------------------------------------------------------------------------
    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        t = core.tensors(batch)
        t.update(core.score_pass(t, values=True))
        kl, metrics = core.kl_metrics(t, hp.kl_estimator)
        rewards = token_rewards(t["rewards"], kl if hp.kl_coef > 0 else None, t["mask"], hp.kl_coef)
        advantages, returns = masked_gae(
            rewards, t["old_values"], t["mask"], hp.gamma, hp.gae_lambda
        )
        if hp.whiten_advantages:
            advantages = global_masked_whiten(self, advantages, t["mask"])
        t["advantages"], t["returns"] = advantages, returns

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pg, stats = ppo_token_policy_losses(
                out.logprobs, sub["old_logprobs"], sub["advantages"], hp.clip_low, hp.clip_high
            )
            vf = ppo_token_value_losses(
                out.values, sub["old_values"], sub["returns"], hp.value_clip
            )
            stats.update(policy=pg.detach(), value=vf.detach())
            return pg + hp.vf_coef * vf, stats

        metrics.update(core.optimize(t, token_loss, progress))
        metrics.update(core.reward_metrics(t, batch.group_size))
        mask = t["mask"]
        resid = masked_mean((returns - t["old_values"]) ** 2, mask)
        var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        ev = torch.where(var > 0, 1.0 - resid / var.clamp_min(1e-12), torch.zeros_like(var))
        stats = self.all_reduce_mean(torch.stack([ev, masked_mean(t["old_values"], mask)]))
        metrics["value/explained_variance"], metrics["value/mean"] = stats.tolist()
        return metrics
