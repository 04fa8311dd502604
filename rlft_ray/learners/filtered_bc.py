"""Filtered behaviour cloning: rejection sampling on gym episodes, then imitation of the best.

The env runners (:class:`~rlft_ray.rollout.episodes.EpisodeCollector`) play whole
episodes with the current policy and keep the top ``filtered_bc.top_fraction`` by return;
the learner maximises the log-likelihood of the kept steps' actions (%BC, Chen et al.
2021; self-imitation, Oh et al. 2018)::

    L = - (1 / S) sum_{(s, a) kept} log pi(a | s)  -  ent_coef * mean entropy

Started from a pretrained policy (``init_from`` a PPO checkpoint), each iteration moves
the policy towards its own best episodes: a cross-entropy-method style improvement.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import (
    Learner,
    LearnerContext,
    Spaces,
    TaskProbe,
    policy_from_spaces,
    to_tensor,
)
from rlft_ray.learners.ddp import check_finite, global_sum
from rlft_ray.learners.nets import ActorCritic
from rlft_ray.types import EpisodeBatch


class FilteredBCLearner(Learner):
    """Behaviour cloning of each iteration's kept episodes; DDP across ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.filtered_bc
        self.policy, self.model, self.optimizer = self.build_policy(spaces, self.hp.lr, eps=1e-5)
        self.torch_rng = torch.Generator().manual_seed(cfg.seed + 104_729 * ctx.rank)

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        """The env checks, plus a time limit: the actors wait for whole episodes, and an
        episode that never ends would keep them waiting forever."""
        import gymnasium as gym

        probe = super().probe(cfg)
        limit = cfg.env.max_episode_steps or gym.spec(cfg.env.id).max_episode_steps
        if limit is None:
            raise ConfigError(
                "env.max_episode_steps",
                f"{cfg.env.id} has no time limit; filtered BC collects whole episodes, so set one",
            )
        return probe

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        return ActorCritic(spaces.observation, spaces.action, cfg.filtered_bc.hidden_sizes)

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        hp = cfg.filtered_bc
        return {
            "env_cfg": cfg.env,
            "make_policy": partial(policy_from_spaces, cls, cfg),
            "rollout_steps": hp.rollout_steps,
            "seed": cfg.seed + 10_007 * (index + 1),
            "num_threads": max(1, int(cfg.resources.cpus_per_rollout_actor)),
            "episodes_per_sample": hp.episodes_per_actor,
            "top_fraction": hp.top_fraction,
            "min_return": hp.min_return,
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy}

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}

    def update(self, batch: EpisodeBatch, progress: float) -> dict[str, float]:
        hp, dev = self.hp, self.ctx.device
        metrics = _selection_metrics(batch, self.ctx)
        if metrics["rollout/accepted_steps"] == 0:
            return metrics  # every rank agrees (global count): nothing to imitate
        obs = to_tensor(batch.obs, dev, torch.float32)
        actions = to_tensor(batch.actions, dev)
        totals = {"loss/bc_nll": 0.0, "loss/entropy": 0.0, "loss/grad_norm": 0.0}
        steps = 0
        for _epoch in range(hp.num_epochs):
            perm = torch.randperm(len(obs), generator=self.torch_rng).to(dev)
            splits = torch.tensor_split(perm, hp.num_minibatches)
            counts = torch.tensor([float(len(mb)) for mb in splits], device=dev)
            for mb, size in zip(splits, global_sum(counts, self.ctx).tolist()):
                if size == 0:
                    continue  # empty on every rank
                nll, ent, norm = self._step(obs, actions, mb, size)
                totals["loss/bc_nll"] += nll
                totals["loss/entropy"] += ent
                totals["loss/grad_norm"] += norm
                steps += 1
        metrics.update({k: v / max(steps, 1) for k, v in totals.items()})
        metrics.update({"optim/lr": hp.lr, "optim/steps": float(steps)})
        return metrics

    def _step(
        self, obs: torch.Tensor, actions: torch.Tensor, mb: torch.Tensor, global_size: float
    ) -> tuple[float, float, float]:
        """One optimizer step on minibatch ``mb``; its loss is a sum over this rank's rows
        divided by the minibatch's size over all ranks (times the world size, which DDP's
        averaging divides back out). A rank without rows runs one zero-weight row."""
        world, dev = self.ctx.world_size, obs.device
        if len(mb):
            x, a, weight = obs[mb], actions[mb], torch.ones(len(mb), device=dev)
        else:  # no rows of this minibatch here: one zero-weight stand-in row
            x = torch.zeros((1, *obs.shape[1:]), device=dev)
            a = torch.zeros((1, *actions.shape[1:]), dtype=actions.dtype, device=dev)
            weight = torch.zeros(1, device=dev)
        params, values = self.model(x)
        logp, entropy = self.policy.log_prob_entropy(params, a)
        nll_sum = -(logp * weight).sum()
        ent_sum = (entropy * weight).sum()
        # values join with weight 0: DDP needs every parameter in the graph (the critic too)
        loss = (nll_sum - self.hp.ent_coef * ent_sum) * world / global_size + 0.0 * values.sum()
        check_finite("loss/bc_nll", loss)
        norm = self.gradient_step(loss, self.policy.parameters(), self.hp.max_grad_norm)
        n = max(float(weight.sum()), 1.0)
        return float(nll_sum.detach()) / n, float(ent_sum.detach()) / n, float(norm)


def _selection_metrics(batch: EpisodeBatch, ctx: LearnerContext) -> dict[str, float]:
    """Kept fraction and returns of all / kept episodes, over every rank's actors."""
    sel = batch.selection
    r = sel.rewards.astype(np.float64)
    local = torch.tensor(
        [len(r), sel.num_accepted, r.sum(), r[sel.accepted].sum(), len(batch)],
        dtype=torch.float64,
    )
    n, n_acc, r_sum, acc_sum, steps = global_sum(local.to(ctx.device), ctx).tolist()
    out = {
        "rollout/episodes_collected": n,
        "rollout/accept_rate": n_acc / max(n, 1.0),
        "rollout/return_mean_all": r_sum / max(n, 1.0),
        "rollout/accepted_steps": steps,
    }
    if n_acc:
        out["rollout/return_mean_accepted"] = acc_sum / n_acc
    return out
