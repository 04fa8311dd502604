"""The GRPO family end to end on local embedded Ray: DAPO's dynamic sampling (overlapped and
synchronous) and in-run pass@k / maj@k. Slow (about a minute each on a loaded machine); the
loop's wiring of dynamic sampling has a fast test without Ray in ``test_grpo_family.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlft_ray.config import build_config
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("local_ray")


def _dapo_run(model_dir: Path, out: Path, async_rollouts: bool) -> list[dict]:
    heldout = out.parent / f"{out.name}-heldout.jsonl"
    heldout.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(8))
    )
    cfg = build_config(
        EXAMPLES / "arithmetic_dapo.yaml",
        [
            f"lm.model={model_dir}",
            "lm.reward_fn=envs.arithmetic:digit_fraction",  # a spread over random completions
            "lm.max_new_tokens=3",
            "lm.num_samples=2",
            "lm.prompts_per_iteration=8",
            "lm.eval_samples=4",
            f"lm.eval_prompts={heldout}",
            "grpo.overlong_buffer=1",
            "grpo.max_resample_rounds=2",
            "grpo.micro_batch_size=16",
            f"async_rollouts={str(async_rollouts).lower()}",
            "total_iterations=3",
            "eval_every=3",
            "checkpoint_every=3",
            "seed=3",
        ],
    )
    run_training(cfg, out, progress=False)
    return read_metrics(out)


def _check(rows: list[dict]) -> None:
    assert [r["counters/iteration"] for r in rows] == [1, 2, 3]
    generated = 0
    for r in rows:
        assert r["rollout/filtered_groups"] >= 0 and r["rollout/resample_rounds"] <= 2
        assert r["rollout/extra_samples"] == 16 * r["rollout/resample_rounds"]
        generated += 16 + r["rollout/extra_samples"]
        assert r["rollout/flat_group_frac"] == 0.0 or r["rollout/resample_rounds"] == 2
    # env steps count every generated completion, the dropped ones too
    assert rows[-1]["counters/env_steps"] == generated
    last = rows[-1]
    for key in ("eval/accuracy", "eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/maj@4"):
        assert 0.0 <= last[key] <= 1.0, key
    assert last["eval/pass@1"] <= last["eval/pass@2"] <= last["eval/pass@4"]


@pytest.mark.slow
def test_dapo_dynamic_sampling_overlapped(model_dir: Path, tmp_path: Path) -> None:
    _check(_dapo_run(model_dir, tmp_path / "a", async_rollouts=True))


@pytest.mark.slow
def test_dapo_dynamic_sampling_synchronous(model_dir: Path, tmp_path: Path) -> None:
    rows = _dapo_run(model_dir, tmp_path / "s", async_rollouts=False)
    _check(rows)
    assert all(r["rollout/policy_lag"] == 0.0 for r in rows)
