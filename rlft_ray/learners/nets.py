"""Small torch policies for gymnasium tasks.

Every policy exposes the interface the env runners call:
``act(obs, deterministic) -> (actions, logprobs, values)`` and ``value(obs)``.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal


def space_signature(space: gym.Space) -> str:
    """A short, comparable description of a space (checked when loading checkpoints)."""
    if isinstance(space, gym.spaces.Discrete):
        return f"Discrete({space.n})"
    if isinstance(space, gym.spaces.Box):
        return f"Box{tuple(space.shape)}"
    return type(space).__name__


def flat_dim(space: gym.Space) -> int:
    """Number of inputs an MLP needs for observations from ``space``."""
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    raise ValueError(f"unsupported observation space {space}; use a Box or Discrete space")


def mlp(in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, out_gain: float) -> nn.Sequential:
    """Tanh MLP with orthogonal init (gain sqrt(2) hidden, ``out_gain`` last), as in CleanRL."""
    layers: list[nn.Module] = []
    last = in_dim
    for h in hidden_sizes:
        layers += [_init(nn.Linear(last, h), math.sqrt(2)), nn.Tanh()]
        last = h
    layers.append(_init(nn.Linear(last, out_dim), out_gain))
    return nn.Sequential(*layers)


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; categorical or diagonal-Gaussian actions.

    ``forward(obs)`` returns ``(dist_params, value)`` so DDP sees every parameter
    used in one call: logits ``[B, A]`` (discrete) or ``(mean, log_std)`` (box).
    """

    def __init__(
        self, obs_space: gym.Space, action_space: gym.Space, hidden_sizes: tuple[int, ...]
    ) -> None:
        super().__init__()
        obs_dim = flat_dim(obs_space)
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        if self.discrete:
            out = int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            out = int(np.prod(action_space.shape))
            self.log_std = nn.Parameter(torch.zeros(out))
        else:
            raise ValueError(f"PPO supports Discrete and Box action spaces, got {action_space}")
        self.actor = mlp(obs_dim, hidden_sizes, out, out_gain=0.01)
        self.critic = mlp(obs_dim, hidden_sizes, 1, out_gain=1.0)

    def forward(
        self, obs: torch.Tensor
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Distribution parameters and ``[B]`` values for ``[B, obs_dim]`` observations."""
        obs = obs.flatten(1).float()
        out = self.actor(obs)
        params = out if self.discrete else (out, self.log_std.expand_as(out))
        return params, self.critic(obs).squeeze(-1)

    def distribution(
        self, params: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.distributions.Distribution:
        """The action distribution for ``forward``'s parameters."""
        if self.discrete:
            return Categorical(logits=params)
        mean, log_std = params
        return Normal(mean, log_std.exp())

    def log_prob_entropy(
        self, params: torch.Tensor | tuple[torch.Tensor, torch.Tensor], actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` log pi(a|s) and ``[B]`` entropy (summed over action dims for box actions)."""
        dist = self.distribution(params)
        if self.discrete:
            return dist.log_prob(actions.long()), dist.entropy()
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample (or take the mode of) actions; returns ``(actions, logprobs, values)``."""
        params, values = self(obs)
        dist = self.distribution(params)
        if deterministic:
            actions = dist.probs.argmax(-1) if self.discrete else dist.mean
        else:
            actions = dist.sample()
        logp = dist.log_prob(actions) if self.discrete else dist.log_prob(actions).sum(-1)
        return actions, logp, values

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B]`` V(s)."""
        return self.critic(obs.flatten(1).float()).squeeze(-1)


class QNetwork(nn.Module):
    """MLP Q-network with ε-greedy acting; ε travels with the weights as a buffer."""

    def __init__(
        self, obs_space: gym.Space, action_space: gym.Space, hidden_sizes: tuple[int, ...]
    ) -> None:
        super().__init__()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"DQN needs a Discrete action space, got {action_space}")
        self.num_actions = int(action_space.n)
        self.q = mlp(flat_dim(obs_space), hidden_sizes, self.num_actions, out_gain=1.0)
        self.register_buffer("epsilon", torch.tensor(1.0))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``[B, A]`` Q-values."""
        return self.q(obs.flatten(1).float())

    @torch.no_grad()
    def act(
        self, obs: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ε-greedy actions (greedy if ``deterministic``); logprobs and values are zeros."""
        q = self(obs)
        actions = q.argmax(-1)
        if not deterministic:
            explore = torch.rand(actions.shape) < float(self.epsilon)
            random_actions = torch.randint(0, self.num_actions, actions.shape)
            actions = torch.where(explore, random_actions, actions)
        zeros = torch.zeros(actions.shape[0])
        return actions, zeros, zeros

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """DQN keeps no state-value baseline for the runners: zeros."""
        return torch.zeros(obs.shape[0])
