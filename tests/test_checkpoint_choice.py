"""checkpoint_best is chosen by truth: a held-out metric when there is one (each evaluation
checkpointed), else the training score averaged over a window; summary.json names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.train import Checkpoint

from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.run.callback import RunDirCallback
from rlft_ray.run.metrics import write_summary


def _report(cb: RunDirCallback, tmp: Path, rows: list[dict], checkpoint: bool) -> None:
    ckpt = None
    if checkpoint:
        src = tmp / f"src-{int(rows[-1]['counters/iteration'])}"
        src.mkdir()
        (src / "iteration.txt").write_text(str(int(rows[-1]["counters/iteration"])))
        ckpt = Checkpoint.from_directory(str(src))
    cb.after_report(None, [{**rows[-1], "_rows": rows}], ckpt)


def _best_iteration(out: Path) -> int:
    return int((out / "checkpoint_best" / "iteration.txt").read_text())


def test_a_training_score_is_averaged_so_one_lucky_batch_does_not_choose(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    cb = RunDirCallback(str(out), "reward/mean", window=3)
    rewards = [0.2, 0.3, 0.9, 0.4, 0.5, 0.6]  # a spike at iteration 3
    rows = [{"counters/iteration": float(i + 1), "reward/mean": r} for i, r in enumerate(rewards)]
    _report(cb, tmp_path, rows[:3], checkpoint=True)  # mean(0.2, 0.3, 0.9) = 0.4667
    _report(cb, tmp_path, rows[3:], checkpoint=True)  # mean(0.4, 0.5, 0.6) = 0.5
    assert _best_iteration(out) == 6  # the last row alone would have kept iteration 3 (0.9)
    score = json.loads((out / "checkpoint_best" / "score.json").read_text())
    assert score == {
        "metric": "reward/mean",
        "value": pytest.approx(0.5),
        "iteration": 6.0,
        "averaged_over": 3,
    }


def test_a_held_out_metric_chooses_and_a_learned_reward_never_does(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    cb = RunDirCallback(str(out), "eval/accuracy", window=10)
    # the learned reward keeps rising while the held-out accuracy peaks at iteration 2
    reports = [
        ({"counters/iteration": 2.0, "reward/mean": 1.0, "eval/accuracy": 0.47}, True),
        ({"counters/iteration": 3.0, "reward/mean": 3.0}, True),  # no evaluation: never best
        ({"counters/iteration": 4.0, "reward/mean": 5.0, "eval/accuracy": 0.33}, True),
    ]
    for row, ckpt in reports:
        _report(cb, tmp_path, [row], checkpoint=ckpt)
    assert _best_iteration(out) == 2
    assert (out / "checkpoint_last" / "iteration.txt").read_text() == "4"
    summary = write_summary(out, 1.0)
    assert summary["checkpoint_best_score"]["metric"] == "eval/accuracy"
    assert summary["checkpoint_best_score"]["value"] == pytest.approx(0.47)
    assert summary["checkpoint_best_score"]["iteration"] == 2.0


@pytest.mark.parametrize(
    ("overrides", "metric"),
    [
        (["algo=grpo"], "reward/mean"),
        (["algo=grpo", "eval_every=5"], "eval/accuracy"),
        (["algo=dpo", "eval_every=5"], "eval/accuracy"),
        (["algo=reward_model", "eval_every=5"], "eval/pairwise_accuracy"),
        (["algo=ppo", "eval_every=5"], "eval/return_mean"),
        (["algo=ppo"], "rollout/episode_return_mean"),
        (["algo=grpo", "eval_every=5", "best_metric=reward/mean"], "reward/mean"),
    ],
)
def test_which_metric_chooses_checkpoint_best(overrides: list[str], metric: str) -> None:
    cfg = build_config(overrides=overrides)
    assert get_learner_cls(cfg.algo).best_metric(cfg) == metric


def test_an_eval_metric_without_evaluations_is_refused() -> None:
    with pytest.raises(ConfigError, match="best_metric.*eval_every"):
        build_config(overrides=["algo=grpo", "best_metric=eval/accuracy"])
