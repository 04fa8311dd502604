"""An LM agent trains end to end: GRPO on rlft/ToolArithmetic-v0 through `rlft-ray train`'s
path (generation actors + learner), from a briefly supervised tool-format base; the tool
call rate rises, the agent metrics and checkpoints are written, and --resume continues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlft_ray.apps.make_agent_base import build_agent_base
from rlft_ray.config import build_config
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tool_arithmetic_grpo.yaml"

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.mark.slow
def test_grpo_agent_learns_to_call_the_calculator_and_resumes(tmp_path: Path) -> None:
    build_agent_base(
        tmp_path / "base",
        "rlft/ToolArithmetic-v0",
        demos=300,
        steps=400,
        seconds=240,
        log=lambda _: None,
    )
    overrides = [
        f"lm.model={tmp_path / 'base' / 'sft_base'}",
        "total_iterations=16",
        "eval_every=8",
        "eval_episodes=32",
        "checkpoint_every=8",
        "seed=0",
    ]
    out = tmp_path / "run"
    summary = run_training(build_config(EXAMPLE, overrides), out, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 17))
    calls = [r["rollout/tool_calls_mean"] for r in rows]
    assert np.mean(calls[-4:]) > np.mean(calls[:4]) + 0.1, calls  # the tool pays: it is used more
    for key in ("rollout/turns_mean", "rollout/env_s", "rollout/truncated_frac", "loss/policy"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert summary["env"] == "rlft/ToolArithmetic-v0" and "eval/accuracy" in rows[-1]
    assert (out / "checkpoint_last" / "policy" / "config.json").is_file()
    more = build_config(EXAMPLE, [*overrides, "total_iterations=18"])
    summary = run_training(more, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 19))
    assert summary["policy_version"] == 18
