"""DQN learner: replay filled by the env runners, double-DQN targets, target network."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
from torch import nn

from rlft_ray.algorithms import dqn_loss, dqn_targets, linear_schedule, polyak_update
from rlft_ray.config import RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces
from rlft_ray.learners.ddp import check_finite
from rlft_ray.learners.nets import QNetwork
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
        """Append ``[B, ...]`` transitions (a batch larger than the capacity keeps its last ones)."""
        n = min(obs.shape[0], self.capacity)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.next_obs[idx] = obs[-n:], next_obs[-n:]
        self.actions[idx], self.rewards[idx] = actions[-n:], rewards[-n:]
        self.terminated[idx] = terminated[-n:]
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The stored transitions as laid out in the ring, its write position and the RNG state."""
        n = self.size
        return {
            "obs": self.obs[:n],
            "actions": self.actions[:n],
            "rewards": self.rewards[:n],
            "next_obs": self.next_obs[:n],
            "terminated": self.terminated[:n],
            "pos": np.array(self.pos),
            "rng": np.array(json.dumps(self.rng.bit_generator.state)),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`: exactly at the same capacity, else the newest
        ``capacity`` transitions in order."""
        if state["obs"].shape[1:] != self.obs.shape[1:]:
            raise ValueError(
                f"replay observations have shape {state['obs'].shape[1:]}, "
                f"this run's are {self.obs.shape[1:]}"
            )
        keys = ("obs", "actions", "rewards", "next_obs", "terminated")
        n, pos = len(state["obs"]), int(state["pos"])
        if n <= self.capacity and (n == self.capacity or pos == n):
            for k in keys:
                getattr(self, k)[:n] = state[k]
            self.pos, self.size = pos % self.capacity, n
        else:  # another capacity: replay oldest-first (the ring starts at pos when full)
            self.pos = self.size = 0
            self.add(*(np.roll(state[k], -pos, axis=0) for k in keys))
        self.rng.bit_generator.state = json.loads(str(state["rng"]))

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
        self.q, self.model, self.optimizer = self.build_policy(spaces, self.hp.lr)
        self.target = copy.deepcopy(self.q).requires_grad_(False)
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

    def rank_state(self) -> dict[str, np.ndarray]:
        # The replay is this rank's shard of the data; saving it makes --resume lossless.
        return {**self.replay.state_dict(), "grad_steps": np.array(self.grad_steps)}

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.replay.load_state_dict(state)
        self.grad_steps = int(state["grad_steps"])

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
            check_finite("loss/td", loss)
            grad_norm = self.gradient_step(loss, self.q.parameters(), hp.max_grad_norm)
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
