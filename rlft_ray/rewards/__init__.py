"""Reward functions: loading them by name, calling them safely, and built-in verifiers.

A reward function has the signature
``fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]`` and is
named in configs as ``"package.module:function"``. The built-in verifiers are named through
this package (``lm.reward_fn: rlft_ray.rewards:final_number``):

* :func:`final_number`: the last number in the completion equals the answer numerically.
* :func:`exact_match`: the completion equals the answer (whitespace, a trailing period aside).
* :func:`boxed`: the last ``\\boxed{...}`` holds the answer.
* :func:`answer_format`: the completion is a single number and nothing else.

:mod:`rlft_ray.rewards.loading` loads and validates reward functions,
:mod:`rlft_ray.rewards.verifiers` holds the built-ins. Pure Python (no Ray, no torch).
"""

from rlft_ray.rewards.loading import (
    RewardError,
    RewardFn,
    call_with_timeout,
    compute_rewards,
    compute_rewards_within,
    load_reward_fn,
)
from rlft_ray.rewards.verifiers import (
    answer_format,
    boxed,
    exact_match,
    final_number,
    last_boxed,
    last_number,
    parse_number,
    reference_answer,
)

__all__ = [
    "RewardError",
    "RewardFn",
    "answer_format",
    "boxed",
    "call_with_timeout",
    "compute_rewards",
    "compute_rewards_within",
    "exact_match",
    "final_number",
    "last_boxed",
    "last_number",
    "load_reward_fn",
    "parse_number",
    "reference_answer",
]
