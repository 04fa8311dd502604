"""Schema of the gymnasium side: the environment and the PPO / DQN sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlft_ray.config.errors import require


@dataclass(frozen=True)
class EnvConfig:
    """Which environment the env runners step.

    Attributes:
        id: A registered gymnasium id (``CartPole-v1``, ``rlft/Navigation-v0``, ...).
        kwargs: Keyword arguments for ``gymnasium.make`` (e.g. ``goal``, ``action_type``).
        num_envs_per_runner: Sub-environments in each runner's vector env.
        max_episode_steps: Optional override of the env's time limit.
        step_timeout_s: Longest ``step`` of a text environment (LM agents; tools run
            inside it): a step past it ends its episode as failed, with the reason
            recorded (``rollout/failed_episodes``), and the run goes on.
        train_seeds: LM agents: the reset seeds training episodes draw from
            (``seed .. seed + train_seeds - 1``; each seed's ``lm.num_samples`` episodes form
            one GRPO group); held-out episodes use seeds from 1,000,000 on.
    """

    id: str = "CartPole-v1"
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_envs_per_runner: int = 4
    max_episode_steps: int | None = None
    step_timeout_s: float = 30.0
    train_seeds: int = 10_000

    def __post_init__(self) -> None:
        require(bool(self.id), "id", "must name a gymnasium environment id")
        require(self.step_timeout_s > 0, "step_timeout_s", "must be > 0 seconds")
        require(self.train_seeds >= 1, "train_seeds", "must be >= 1")
        require(self.num_envs_per_runner >= 1, "num_envs_per_runner", "must be >= 1")
        require(
            self.max_episode_steps is None or self.max_episode_steps >= 1,
            "max_episode_steps",
            "must be >= 1 or null",
        )


@dataclass(frozen=True)
class PPOConfig:
    """PPO with GAE, clipped surrogate and clipped value loss (Schulman et al. 2017).

    Defaults follow CleanRL's ``ppo.py`` and the 37 implementation details
    (Huang et al. 2022), tuned for CartPole-v1 on 2 env runners.
    """

    lr: float = 1e-3
    anneal_lr: bool = True
    rollout_steps: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_epochs: int = 6
    num_minibatches: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    hidden_sizes: tuple[int, ...] = (64, 64)

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        require(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
        require(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        require(self.num_minibatches >= 1, "num_minibatches", "must be >= 1")
        require(self.clip_coef > 0, "clip_coef", f"must be > 0 (got {self.clip_coef})")
        require(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        require(self.ent_coef >= 0, "ent_coef", "must be >= 0")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0")
        require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "sizes must be >= 1")


@dataclass(frozen=True)
class DQNConfig:
    """Double DQN with replay and a target network (Mnih et al. 2015; van Hasselt et al. 2016).

    ``tau=1.0`` copies the online net into the target every ``target_update_interval``
    gradient steps (hard update); ``tau<1`` does a Polyak update at that interval.
    Exploration ε decays linearly from ``eps_start`` to ``eps_end`` over
    ``exploration_fraction`` of ``total_env_steps``.
    """

    lr: float = 5e-4
    rollout_steps: int = 16
    buffer_size: int = 50_000
    learning_starts: int = 1_000
    batch_size: int = 128
    updates_per_iteration: int = 32
    gamma: float = 0.99
    double_dqn: bool = True
    tau: float = 1.0
    target_update_interval: int = 250
    eps_start: float = 1.0
    eps_end: float = 0.02
    exploration_fraction: float = 0.3
    max_grad_norm: float = 10.0
    hidden_sizes: tuple[int, ...] = (128, 128)

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
        require(self.buffer_size >= self.batch_size, "buffer_size", "must be >= batch_size")
        require(self.learning_starts >= 0, "learning_starts", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.updates_per_iteration >= 1, "updates_per_iteration", "must be >= 1")
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        require(0 < self.tau <= 1, "tau", f"must be in (0, 1] (got {self.tau})")
        require(self.target_update_interval >= 1, "target_update_interval", "must be >= 1")
        require(
            0 <= self.eps_end <= self.eps_start <= 1,
            "eps_end",
            "need 0 <= eps_end <= eps_start <= 1",
        )
        require(0 < self.exploration_fraction <= 1, "exploration_fraction", "must be in (0, 1]")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "sizes must be >= 1")


@dataclass(frozen=True)
class FilteredBCConfig:
    """Filtered behaviour cloning: rejection sampling on env-runner episodes.

    Each rollout actor plays ``episodes_per_actor`` complete episodes with the current
    policy and keeps the top ``top_fraction`` by return (selection on the actors); the
    learner maximises log pi(a|s) on the kept episodes' steps (Chen et al. 2021's
    %BC baseline; Oh et al. 2018 "Self-Imitation Learning"). Start it from a pretrained
    policy with ``init_from`` (a PPO checkpoint with the same ``hidden_sizes``).

    Attributes:
        episodes_per_actor: Complete episodes each actor collects per iteration.
        top_fraction: Fraction of an actor's episodes kept, by return (at least one).
        min_return: Also drop kept episodes below this return; null: no floor.
        lr: Adam learning rate. num_epochs: Passes over the kept steps.
        num_minibatches: Optimizer steps per pass. ent_coef: Entropy bonus.
        max_grad_norm: Gradient clipping. hidden_sizes: The policy MLP (as PPO's).
        rollout_steps: Steps per sub-env between episode checks on the actor.
    """

    episodes_per_actor: int = 16
    top_fraction: float = 0.25
    min_return: float | None = None
    lr: float = 3e-4
    num_epochs: int = 4
    num_minibatches: int = 4
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    hidden_sizes: tuple[int, ...] = (64, 64)
    rollout_steps: int = 32

    def __post_init__(self) -> None:
        require(self.episodes_per_actor >= 1, "episodes_per_actor", "must be >= 1")
        require(0 < self.top_fraction <= 1, "top_fraction", "must be in (0, 1]")
        require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        require(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        require(self.num_minibatches >= 1, "num_minibatches", "must be >= 1")
        require(self.ent_coef >= 0, "ent_coef", "must be >= 0")
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "sizes must be >= 1")
        require(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
