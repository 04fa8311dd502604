"""One ``Algorithm.train()`` result of RLlib as a ``metrics.jsonl`` row, with rlft-ray's
names where they mean the same (``loss/policy``, ``eval/return_mean``, ...) and RLlib's own
other numbers under ``rllib/``. The driver adds the counters and the window of the last
20 episodes (``rollout/episode_return_mean``, ``rollout/success_rate``) from
:func:`episode_lists`: RLlib's own ``episode_return_mean`` (kept as
``rllib/env_runners/episode_return_mean``) averages only one iteration's episodes."""

from __future__ import annotations

import math
import time
from typing import Any

#: RLlib learner stats that have an rlft-ray name (per module: ``loss/policy/<module>``
#: when several modules learn).
LEARNER_NAMES: dict[str, str] = {
    "policy_loss": "loss/policy",
    "vf_loss": "loss/value",
    "entropy": "loss/entropy",
    "mean_kl_loss": "loss/approx_kl",
    "total_loss": "loss/total",
    "qf_loss": "loss/q",
    "alpha_loss": "loss/alpha",
    "vf_explained_var": "loss/explained_variance",
}


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def env_steps_lifetime(result: dict[str, Any]) -> int:
    """Env steps RLlib has sampled (offline algorithms: trained on) so far."""
    sampled = _number(result.get("num_env_steps_sampled_lifetime")) or _number(
        (result.get("env_runners") or {}).get("num_env_steps_sampled_lifetime")
    )
    if sampled:
        return int(sampled)
    learners = (result.get("learners") or {}).get("__all_modules__") or {}
    return int(_number(learners.get("num_env_steps_trained_lifetime")) or 0)


def episode_lists(runners: dict[str, Any]) -> tuple[list[float], list[bool]]:
    """The returns and successes of the episodes that finished in this iteration (what
    :class:`~rlft_ray.rollout.rllib_env.EpisodeRecorder` logged). RLlib reports a series
    of one item as that item (an iteration in which one episode finished, as Pendulum's
    200-step episodes do in SAC's ~260-step iterations)."""
    from rlft_ray.rollout.rllib_env import RETURNS_KEY, SUCCESSES_KEY

    returns = [float(v) for v in _series(runners.get(RETURNS_KEY))]
    successes = [bool(v) for v in _series(runners.get(SUCCESSES_KEY))]
    return returns, successes


def _series(value: Any) -> list[Any]:
    """A logged item series: a list, one bare item, or nothing (None)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):  # a numpy array / scalar, a torch tensor
        out = value.tolist()
        return out if isinstance(out, list) else [out]
    return [value]


def result_row(result: dict[str, Any]) -> dict[str, float]:
    """The rlft-ray metrics of one RLlib result (counters are added by the caller)."""
    runners = result.get("env_runners") or {}
    row: dict[str, float] = {}
    for src, dest in (
        ("episode_len_mean", "rollout/episode_len_mean"),
        ("num_episodes", "rollout/episodes_this_iter"),
    ):
        if (value := _number(runners.get(src))) is not None:
            row[dest] = value
    for agent, value in (runners.get("agent_episode_returns_mean") or {}).items():
        if (number := _number(value)) is not None:
            row[f"rollout/agent_return_mean/{agent}"] = number
    evaluation = (result.get("evaluation") or {}).get("env_runners") or {}
    eval_returns, eval_successes = episode_lists(evaluation)
    if eval_returns:
        row["eval/return_mean"] = sum(eval_returns) / len(eval_returns)
    if eval_successes:
        row["eval/success_rate"] = sum(eval_successes) / len(eval_successes)
    learners = {k: v for k, v in (result.get("learners") or {}).items() if k != "__all_modules__"}
    for module, stats in learners.items():
        for key, value in (stats or {}).items():
            number = _number(value)
            if number is None:
                continue
            name = LEARNER_NAMES.get(key)
            if name is not None:
                row[name if len(learners) == 1 else f"{name}/{module}"] = number
            else:
                row[f"rllib/learners/{module}/{key}"] = number
    for key, value in runners.items():
        if isinstance(value, (dict, list, tuple)):
            continue
        if (number := _number(value)) is not None:
            row.setdefault(f"rllib/env_runners/{key}", number)
    iteration_s = _number(result.get("time_this_iter_s")) or 0.0
    row["perf/iteration_s"] = iteration_s
    sampled = _number(runners.get("num_env_steps_sampled")) or 0.0
    row["perf/env_steps_per_s"] = sampled / max(iteration_s, 1e-9)
    row["time/unix"] = time.time()
    return row
