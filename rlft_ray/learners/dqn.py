"""DQN learner: replay filled by the env runners, double-DQN targets, target network."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms import dqn_loss, dqn_targets, linear_schedule, polyak_update
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces
from rlft_ray.models import QNetwork
from rlft_ray.types import RolloutBatch


class ReplayBuffer:
    """Uniform FIFO replay of (s, a, r, s', terminated) transitions in numpy ring arrays.

    Args:
        capacity: Transitions kept (oldest overwritten first).
        obs_shape: Shape of one observation.
        seed: Seeds the sampling generator.
    """

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], seed: int) -> None:
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), dtype=np.float32)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
    ) -> None:
        """Append ``[B, ...]`` transitions."""
        for i in range(obs.shape[0]):
            j = self.pos
            self.obs[j], self.next_obs[j] = obs[i], next_obs[i]
            self.actions[j], self.rewards[j], self.terminated[j] = (
                actions[i],
                rewards[i],
                terminated[i],
            )
            self.pos = (self.pos + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> tuple[np.ndarray, ...]:
        """Uniformly sample ``batch_size`` transitions (with replacement)."""
        idx = self.rng.integers(0, self.size, size=batch_size)
        return (
            self.obs[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_obs[idx],
            self.terminated[idx],
        )


class DQNLearner(Learner):
    """(Double) DQN on one rank; the global minibatch is split over DDP ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.dqn
        self.q = self.make_policy(cfg, spaces)
        self.model = self.wrap_ddp(self.q)
        self.target = copy.deepcopy(self.q).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=self.hp.lr)
        self.replay = ReplayBuffer(
            max(1, self.hp.buffer_size // ctx.world_size),
            spaces.observation.shape,
            seed=cfg.seed + ctx.rank,
        )
        self.grad_steps = 0

    @classmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        return QNetwork(spaces.observation, spaces.action, cfg.dqn.hidden_sizes)

    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.q, "target": self.target}

    def after_init_from(self) -> None:
        self.target.load_state_dict(self.q.state_dict())

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.q.state_dict().items()}

    def update(self, batch: RolloutBatch, progress: float) -> dict[str, float]:
        hp, dev = self.hp, self.ctx.device
        self.replay.add(
            batch.obs.reshape(-1, *batch.obs.shape[2:]),
            batch.actions.reshape(-1),
            batch.rewards.reshape(-1),
            batch.next_obs.reshape(-1, *batch.next_obs.shape[2:]),
            batch.terminated.reshape(-1),
        )
        epsilon = linear_schedule(hp.eps_start, hp.eps_end, hp.exploration_fraction, progress)
        self.q.epsilon.fill_(epsilon)
        metrics: dict[str, float] = {
            "explore/epsilon": epsilon,
            "replay/size": float(len(self.replay)),
        }
        # Every rank holds an equal share of the data, so this test agrees across ranks.
        if len(self.replay) * self.ctx.world_size < hp.learning_starts:
            return metrics

        local_batch = max(1, hp.batch_size // self.ctx.world_size)
        losses, q_means, norms = [], [], []
        for _ in range(hp.updates_per_iteration):
            obs, actions, rewards, next_obs, terminated = (
                torch.as_tensor(x, device=dev) for x in self.replay.sample(local_batch)
            )
            with torch.no_grad():
                next_q_target = self.target(next_obs)
                next_q_online = self.q(next_obs) if hp.double_dqn else None
                targets = dqn_targets(rewards, terminated, next_q_target, hp.gamma, next_q_online)
            q_taken = self.model(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
            loss = dqn_loss(q_taken, targets)
            self.check_finite("loss/td", loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self.q.parameters(), hp.max_grad_norm)
            self.check_finite("loss/grad_norm", grad_norm)
            self.optimizer.step()
            self.grad_steps += 1
            if self.grad_steps % hp.target_update_interval == 0:
                polyak_update(self.target, self.q, hp.tau)
            losses.append(float(loss.detach()))
            q_means.append(float(q_taken.detach().mean()))
            norms.append(float(grad_norm))
        metrics.update(
            {
                "loss/td": float(np.mean(losses)),
                "loss/q_mean": float(np.mean(q_means)),
                "loss/grad_norm": float(np.mean(norms)),
                "counters/grad_steps": float(self.grad_steps),
            }
        )
        return metrics
