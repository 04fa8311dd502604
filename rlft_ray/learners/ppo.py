"""PPO learner for gymnasium tasks (clipped surrogate, GAE, value clipping)."""

from __future__ import annotations

import torch
from torch import nn

from rlft_ray.algorithms import (
    compute_gae,
    lr_factor,
    normalize_advantages,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, to_tensor
from rlft_ray.learners.ddp import all_reduce_mean, check_finite, global_mean_std
from rlft_ray.learners.nets import ActorCritic
from rlft_ray.types import RolloutBatch


class PPOLearner(Learner):
    """PPO on one rank; DDP averages gradients when there are several."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.ppo
        self.policy, self.model, self.optimizer = self.build_policy(spaces, self.hp.lr, eps=1e-5)

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        return ActorCritic(spaces.observation, spaces.action, cfg.ppo.hidden_sizes)

    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy}

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}

    def update(self, batch: RolloutBatch, progress: float) -> dict[str, float]:
        hp, dev = self.hp, self.ctx.device
        # GAE over the time-major segment [T, N], then flatten to B = T * N samples.
        advantages, returns = compute_gae(
            to_tensor(batch.rewards, dev),
            to_tensor(batch.values, dev),
            to_tensor(batch.terminated, dev),
            to_tensor(batch.truncated, dev),
            to_tensor(batch.bootstrap_values, dev),
            to_tensor(batch.last_values, dev),
            hp.gamma,
            hp.gae_lambda,
        )
        obs = to_tensor(batch.obs, dev).flatten(0, 1)
        actions = to_tensor(batch.actions, dev).flatten(0, 1)
        old_logp = to_tensor(batch.logprobs, dev).flatten()
        old_values = to_tensor(batch.values, dev).flatten()
        advantages, returns = advantages.flatten(), returns.flatten()
        adv_mean, adv_std = global_mean_std(advantages, self.ctx)

        lr = hp.lr * lr_factor(progress, "linear" if hp.anneal_lr else "constant")
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        size = obs.shape[0]
        mb_size = max(1, size // hp.num_minibatches)
        totals: dict[str, float] = {}
        count = 0
        for _epoch in range(hp.num_epochs):
            perm = torch.randperm(size, device=dev)
            epoch_kl = torch.zeros((), device=dev)
            for start in range(0, mb_size * hp.num_minibatches, mb_size):
                mb = perm[start : start + mb_size]
                params, new_values = self.model(obs[mb])
                new_logp, entropy = self.policy.log_prob_entropy(params, actions[mb])
                mb_adv = advantages[mb]
                if hp.norm_adv:
                    mb_adv = normalize_advantages(mb_adv, adv_mean, adv_std)

                pg_loss, stats = ppo_policy_loss(new_logp, old_logp[mb], mb_adv, hp.clip_coef)
                v_loss = ppo_value_loss(
                    new_values, old_values[mb], returns[mb], hp.clip_coef if hp.clip_vloss else None
                )
                ent = entropy.mean()
                loss = pg_loss - hp.ent_coef * ent + hp.vf_coef * v_loss
                check_finite("loss/total", loss)

                grad_norm = self.gradient_step(loss, self.policy.parameters(), hp.max_grad_norm)

                epoch_kl += stats["approx_kl"]
                for key, val in (
                    ("loss/policy", pg_loss),
                    ("loss/value", v_loss),
                    ("loss/entropy", ent),
                    ("loss/approx_kl", stats["approx_kl"]),
                    ("loss/clip_frac", stats["clip_frac"]),
                    ("loss/grad_norm", grad_norm),
                ):
                    totals[key] = totals.get(key, 0.0) + float(val.detach())
                count += 1
            # Early stop on KL must be decided identically on every rank (else DDP hangs).
            mean_kl = all_reduce_mean(epoch_kl / hp.num_minibatches, self.ctx)
            if hp.target_kl is not None and float(mean_kl) > hp.target_kl:
                break

        metrics = {k: v / max(count, 1) for k, v in totals.items()}
        var_returns = returns.var()
        metrics["loss/explained_variance"] = (
            float(1.0 - (returns - old_values).var() / var_returns) if var_returns > 0 else 0.0
        )
        metrics["optim/lr"] = lr
        return metrics
