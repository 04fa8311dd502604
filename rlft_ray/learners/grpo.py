"""GRPO, RLOO and REINFORCE for causal LMs: critic-free, with group/batch baselines.

One update per batch of ``lm.prompts_per_iteration`` prompts x ``lm.num_samples``
completions: sequence rewards (minus ``kl_coef`` x summed KL when ``kl_in=reward``)
become advantages by the configured estimator, broadcast over each completion's
tokens in a PPO-clipped surrogate, plus ``kl_coef`` x KL(pi || pi_ref) in the loss
when ``kl_in=loss`` (GRPO; Shao et al. 2024).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rlft_ray.algorithms.lm import group_advantages, kl_penalty, masked_sum, ppo_token_policy_losses
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import EvalOptions, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.lm_core import LMCore, evaluate_lm, lm_sampler_kwargs, probe_lm
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch


class GRPOLearner(Learner):
    """GRPO / RLOO / REINFORCE (``grpo.estimator``) on one rank; DDP across ranks."""

    sampler_cls: ClassVar[type] = GenerationActor
    score_metric: ClassVar[str] = "reward/mean"
    curve: ClassVar[tuple[str, str, str]] = (
        "reward/mean",
        "counters/iteration",
        "reward_curve.png",
    )

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.grpo
        self.core = LMCore(self, self.hp)
        self.optimizer = self.core.optimizer

    # -- class-level hooks -----------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        if cfg.grpo.estimator == "rloo" and cfg.lm.num_samples < 2:
            raise ConfigError(
                "lm.num_samples", "grpo.estimator=rloo needs at least 2 completions per prompt"
            )
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
    def advantages(self, scores: torch.Tensor, group_size: int) -> torch.Tensor:
        """``[B]`` sequence advantages; REINFORCE's baseline is the mean over all ranks."""
        if self.hp.estimator == "reinforce":
            return scores - self.all_reduce_mean(scores.float().mean())
        return group_advantages(
            scores, group_size, self.hp.estimator, std_normalize=self.hp.std_normalize
        )

    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        t = core.tensors(batch)
        t.update(core.score_pass(t))
        kl, metrics = core.kl_metrics(t, hp.kl_estimator)
        scores = t["rewards"].float()
        if hp.kl_in == "reward" and kl is not None and hp.kl_coef > 0:
            scores = scores - hp.kl_coef * masked_sum(kl, t["mask"], dim=-1)
        t["advantages"] = self.advantages(scores, batch.group_size)
        kl_in_loss = hp.kl_in == "loss" and hp.kl_coef > 0

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss, stats = ppo_token_policy_losses(
                out.logprobs, sub["old_logprobs"], sub["advantages"], hp.clip_low, hp.clip_high
            )
            stats["policy"] = loss.detach()
            if kl_in_loss:
                kl_tok = kl_penalty(out.logprobs, sub["ref_logprobs"], hp.kl_estimator)
                stats["kl"] = kl_tok.detach()
                loss = loss + hp.kl_coef * kl_tok
            return loss, stats

        metrics.update(core.optimize(t, token_loss, progress))
        metrics.update(core.reward_metrics(t, batch.group_size))
        metrics["adv/abs_mean"] = float(self.all_reduce_mean(t["advantages"].abs().mean()))
        return metrics
