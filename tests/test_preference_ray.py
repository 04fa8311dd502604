"""Preference learning on local embedded Ray: offline DPO with reference log-probs computed
on actors and cached, a reward model served by scorer actors to GRPO, and online DPO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlft_ray.config import build_config
from rlft_ray.learners.dpo import DPOLearner
from rlft_ray.learners.pairwise import PAIRS
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = ROOT / "data"


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in (DATA / "arith_train.jsonl").read_text().splitlines()]
    folder = tmp_path_factory.mktemp("pairs")

    def write(name: str, part: list[dict]) -> Path:
        path = folder / name
        lines = [
            {"prompt": r["prompt"], "chosen": r["answer"], "rejected": "?" * len(r["answer"])}
            for r in part
        ]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return path

    return write("train.jsonl", rows[:96]), write("test.jsonl", rows[96:128])


@pytest.mark.slow  # 37-45 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_dpo_precomputes_reference_logps_once_and_reuses_the_cache(
    model_dir: Path, pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    overrides = [
        f"lm.model={model_dir}",
        f"lm.pairs={pairs[0]}",
        "lm.eval_pairs=null",
        f"lm.eval_prompts={DATA / 'arith_test.jsonl'}",
        "dpo.batch_size=16",
        "dpo.micro_batch_size=8",
        "dpo.num_epochs=2",
        "dpo.optim.lr=3e-3",
        "dpo.sft_coef=0.0",
        "eval_every=6",
        "checkpoint_every=6",
    ]
    summary = run_training(
        build_config(EXAMPLES / "arithmetic_dpo.yaml", overrides), tmp_path / "d", progress=False
    )
    rows = read_metrics(tmp_path / "d")
    assert summary["error"] is None and summary["iterations"] == 12 == len(rows)  # 2 x 96 / 16
    assert summary["ref_logps/reused"] is False
    cache = Path(summary["ref_logps/cache"])
    assert cache.parent == pairs[0].parent and cache.name.startswith("train.jsonl.ref-")
    assert rows[0]["loss/dpo"] == pytest.approx(np.log(2), abs=1e-3)  # policy == reference
    assert rows[-1]["loss/dpo"] < rows[0]["loss/dpo"] and rows[-1]["rewards/margins"] > 0
    assert [r["counters/iteration"] for r in rows if "eval/accuracy" in r] == [6, 12]
    assert all(r["perf/pairs_per_s"] > 0 for r in rows)
    # a later run with the same model and pairs reads the cache instead of recomputing
    cfg = build_config(EXAMPLES / "arithmetic_dpo.yaml", [*overrides, "dpo.num_epochs=1"])
    probe = DPOLearner.probe(cfg)
    again = DPOLearner.prepare(probe.cfg, probe, tmp_path / "d2")
    assert again.info["ref_logps/reused"] is True and again.info["ref_logps/cache"] == str(cache)
    cached = again.datasets[PAIRS]
    reference = pd.read_parquet(cache)
    merged = cached.merge(reference, on="pair_index", suffixes=("", "_file"))
    assert len(merged) == 96 and (merged["ref_chosen"] == merged["ref_chosen_file"]).all()
    # ... and a changed pair file never does: its hash differs
    edited = pairs[0].with_name("edited.jsonl")
    edited.write_text(pairs[0].read_text().replace('"rejected": "?', '"rejected": "!', 1))
    moved = build_config(EXAMPLES / "arithmetic_dpo.yaml", [*overrides, f"lm.pairs={edited}"])
    probe = DPOLearner.probe(moved)
    fresh = DPOLearner.prepare(probe.cfg, probe, tmp_path / "d3")
    assert fresh.info["ref_logps/reused"] is False and fresh.info["ref_logps/cache"] != str(cache)


@pytest.mark.slow  # 37-45 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_reward_model_trains_then_scores_for_grpo(
    model_dir: Path, pairs: tuple[Path, Path], tmp_path: Path
) -> None:
    rm_cfg = build_config(
        EXAMPLES / "arithmetic_rm.yaml",
        [
            f"lm.model={model_dir}",
            f"lm.pairs={pairs[0]}",
            f"lm.eval_pairs={pairs[1]}",
            "reward_model.num_epochs=4",
            "reward_model.batch_size=16",
            "reward_model.optim.lr=3e-3",
            "eval_every=6",
            "checkpoint_every=24",
        ],
    )
    summary = run_training(rm_cfg, tmp_path / "rm", progress=False)
    rows = read_metrics(tmp_path / "rm")
    assert summary["error"] is None and len(rows) == 24
    evals = [r["eval/pairwise_accuracy"] for r in rows if "eval/pairwise_accuracy" in r]
    assert len(evals) == 4 and evals[-1] > 0.9  # digits against '?': easy to tell apart
    assert (tmp_path / "rm" / "checkpoint_last" / "policy" / "config.json").is_file()

    grpo = build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [
            f"lm.model={model_dir}",
            f"lm.eval_prompts={DATA / 'arith_test.jsonl'}",
            f"lm.reward_model={tmp_path / 'rm' / 'checkpoint_last'}",
            "lm.num_samples=4",
            "lm.max_new_tokens=4",
            "total_iterations=4",
            "eval_every=2",
        ],
    )
    summary = run_training(grpo, tmp_path / "g", progress=False)
    rows = read_metrics(tmp_path / "g")
    assert summary["error"] is None and len(rows) == 4
    # rewards come from the reward model (scorer actors): real numbers, not the verifier's 0/1
    assert any(r["reward/mean"] not in (0.0, 1.0) for r in rows)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 2 and all("eval/reward_model_mean" in r for r in evals)


@pytest.mark.slow  # 28 s; its pairing and reference refresh are unit-tested in test_preference.py
def test_online_dpo_ranks_the_actors_samples(model_dir: Path, tmp_path: Path) -> None:
    cfg = build_config(
        EXAMPLES / "arithmetic_online_dpo.yaml",
        [
            f"lm.model={model_dir}",
            f"lm.prompts={DATA / 'arith_train.jsonl'}",
            "lm.eval_prompts=null",
            "lm.reward_fn=envs.arithmetic:digit_fraction",  # graded: groups have a spread
            "lm.num_samples=4",
            "lm.max_new_tokens=4",
            "lm.prompts_per_iteration=8",
            "online_dpo.ref_refresh_every=3",
            "total_iterations=6",
            "eval_every=null",
        ],
    )
    summary = run_training(cfg, tmp_path / "o", progress=False)
    rows = read_metrics(tmp_path / "o")
    assert summary["error"] is None and len(rows) == 6
    for r in rows:
        assert r["rollout/pairs"] + r["rollout/flat_group_frac"] * 8 == pytest.approx(8)
        if r["rollout/pairs"]:
            assert np.isfinite(r["loss/dpo"]) and "rewards/margins" in r
    # the policy became the reference after exactly 3 and 6 updates: before iteration 4
    # (iteration 7 is past the end), whatever version the batches were sampled with
    assert [r["optim/ref_refreshed"] for r in rows] == [0, 0, 0, 1, 0, 0]
