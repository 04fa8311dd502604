"""Fault-injection wrapper env, for testing how runs fail (not for training).

``rlft/NaNReward-v0`` behaves like ``base_id`` (CartPole-v1 by default) until the
process has taken ``nan_after_steps`` steps, then returns NaN rewards. The
learner's NaN guard must stop the run with a clear message.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym


class NaNRewardEnv(gym.Wrapper):
    """Wraps ``gym.make(base_id)``; rewards turn NaN after ``nan_after_steps`` steps.

    Args:
        base_id: The environment to wrap.
        nan_after_steps: Steps (in this env instance) before rewards become NaN.
    """

    def __init__(self, base_id: str = "CartPole-v1", nan_after_steps: int = 1000) -> None:
        if nan_after_steps < 0:
            raise ValueError(f"nan_after_steps must be >= 0, got {nan_after_steps}")
        super().__init__(gym.make(base_id).unwrapped)
        self.nan_after_steps = nan_after_steps
        self.steps = 0

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps > self.nan_after_steps:
            reward = float("nan")
        return obs, reward, terminated, truncated, info
