"""Whole jobs with ``lm.backend=vllm`` on local embedded Ray: ``rlft-ray sample``
(rejection sampling on the actors, ``--resume``), and a GRPO run that learns, is
evaluated with ``rlft-ray eval`` and resumes. Needs vLLM (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from vllm_helpers import tiny_llama

from rlft_ray.apps.sample import PARTS, run_sampling
from rlft_ray.cli import main
from rlft_ray.config import build_config
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("local_ray")]
pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES, DATA = ROOT / "examples", ROOT / "data"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("vllm_runs") / "llama", max_positions=64)


def _bon(model_dir: Path, prompts: Path, *overrides: str) -> list[str]:
    return [
        f"lm.model={model_dir}",
        f"lm.prompts={prompts}",
        "lm.backend=vllm",
        "lm.reward_fn=envs.arithmetic:digit_fraction",
        "lm.num_samples=4",
        "lm.max_new_tokens=4",
        "rsft.min_reward=null",
        "resources.num_rollout_actors=1",
        *overrides,
    ]


def test_sample_job_with_vllm_selects_and_resumes_to_the_same_set(
    llama_dir: Path, tmp_path: Path
) -> None:
    """Best-of-4 on the vLLM actor; after two lost parts ``--resume`` samples only their
    prompts, and (each batch seeded by its first prompt, vLLM's sampling seeded from it)
    the accepted set is the same."""
    prompts = tmp_path / "p.jsonl"
    lines = (DATA / "arith_train.jsonl").read_text().splitlines()[:24]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bon"
    cfg = build_config(EXAMPLES / "arithmetic_bon.yaml", _bon(llama_dir, prompts))
    summary = run_sampling(cfg, out, prompts_per_batch=8, progress=False)
    assert (summary["prompts"], summary["samples"], summary["accepted"]) == (24, 96, 24)
    rows = pd.concat([pd.read_parquet(p) for p in (out / PARTS).glob("part-*.parquet")])
    # best-of-n: each prompt's accepted sample has its group's highest reward
    best = rows.groupby("prompt_index")["reward"].max()
    kept = rows[rows["accepted"]].set_index("prompt_index")["reward"]
    assert np.allclose(kept.sort_index().to_numpy(), best.sort_index().to_numpy())
    assert (rows["logprob"] < 0).all()  # vLLM's per-token log-probs, summed
    accepted = pd.read_json(out / "accepted.jsonl", lines=True)
    for part in sorted((out / PARTS).glob("part-*.parquet"))[1:3]:
        part.unlink()
    code = main(
        [
            "sample",
            str(EXAMPLES / "arithmetic_bon.yaml"),
            *_bon(llama_dir, prompts),
            "--output-dir",
            str(out),
            "--resume",
            "--prompts-per-batch",
            "8",
            "--no-progress",
        ]
    )
    again = json.loads((out / "summary.json").read_text())
    assert code == 0 and again["sampled_this_run"] == 16 * 4 and again["samples"] == 96
    resumed = pd.read_json(out / "accepted.jsonl", lines=True)
    pd.testing.assert_frame_equal(resumed, accepted, check_dtype=False)


@pytest.mark.slow
def test_grpo_with_vllm_learns_evaluates_and_resumes(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    overrides = [
        f"lm.model={llama_dir}",
        "lm.backend=vllm",
        "lm.reward_fn=envs.arithmetic:digit_fraction",  # dense reward a random model can learn
        "lm.max_new_tokens=4",
        "lm.num_samples=4",
        "lm.prompts_per_iteration=8",
        "grpo.optim.lr=3e-3",
        "grpo.kl_coef=0.01",
        "checkpoint_every=12",
        "seed=1",
        # the actors sample with the learner's current weights: the log-prob gap is then
        # engine vs learner alone (overlapped, it would hold one update's change too)
        "async_rollouts=false",
    ]
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=24"])
    run_training(cfg, out, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 25))
    rewards = [r["reward/mean"] for r in rows]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1, rewards
    # fp32 engine and fp32 learner: vLLM's log-probs are the learner's, after every update
    assert all(r["rollout/policy_lag"] == 0 for r in rows)
    assert max(r["rollout/logprob_gap"] for r in rows) < 1e-3
    assert max(r["rollout/logprob_gap_max"] for r in rows) < 1e-2
    assert all(0 < r["perf/weight_sync_s"] < 60 for r in rows)
    # the sync includes the engine's reload, read back once the actor has done it
    assert sum(r["perf/weight_load_s"] > 0 for r in rows) >= len(rows) - 2

    code = main(["eval", str(out / "checkpoint_last"), "--limit", "16"])
    assert code == 0

    more = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=28"])
    summary = run_training(more, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 29))
    assert summary["policy_version"] == 28
    assert np.mean([r["reward/mean"] for r in rows[-4:]]) > np.mean(rewards[:5])
