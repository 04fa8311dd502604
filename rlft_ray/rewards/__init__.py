"""Reward functions: loading them by name and calling them safely.

A reward function has the signature
``fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]`` and is
named in configs as ``"package.module:function"``; :mod:`rlft_ray.rewards.loading` loads and
validates them. Pure Python (no Ray, no torch).
"""

from rlft_ray.rewards.loading import RewardError, RewardFn, compute_rewards, load_reward_fn

__all__ = ["RewardError", "RewardFn", "compute_rewards", "load_reward_fn"]
