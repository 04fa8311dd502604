"""Defences of RL against a learned reward: reward-model ensembles (mean - k * std), reward
clipping, reward whitening for PPO, and the early stop on over-optimisation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft_ray.algorithms.reward_ensemble import clip_reward, ensemble_reward
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.lm_learner import check_reward_fns
from rlft_ray.rollout.scoring import RewardModelScorer
from rlft_ray.run.early_stop import fallen_metric, overoptimization_stop, watched_metrics
from rlft_ray.run.loop import _OveroptimizationWatch

from lm_helpers import make_batch, make_learner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_ensemble_reward_is_the_mean_minus_k_population_stds() -> None:
    scores = torch.tensor([[1.0, 2.0, -1.0], [3.0, 2.0, 1.0], [5.0, 2.0, 0.0]])  # [N=3, B=3]
    # column 0: mean 3, std sqrt((4 + 0 + 4) / 3); column 1: no spread; column 2: mean 0,
    # std sqrt(2 / 3)
    expected = [3 - 0.5 * math.sqrt(8 / 3), 2.0, 0 - 0.5 * math.sqrt(2 / 3)]
    assert ensemble_reward(scores, 0.5).tolist() == pytest.approx(expected, abs=1e-6)
    assert ensemble_reward(scores, 0.0).tolist() == pytest.approx([3.0, 2.0, 0.0])
    assert ensemble_reward(scores[:1], 2.0).tolist() == pytest.approx([1.0, 2.0, -1.0])  # N = 1
    with pytest.raises(ValueError, match="std_coef"):
        ensemble_reward(scores, -1.0)


def test_clip_reward_bounds_both_sides() -> None:
    r = torch.tensor([-3.0, 0.5, 7.0, -2.0])
    assert clip_reward(r, 2.0).tolist() == [-2.0, 0.5, 2.0, -2.0]
    assert clip_reward(r, None) is r
    with pytest.raises(ValueError, match="bound"):
        clip_reward(r, 0.0)


@pytest.fixture(scope="module")
def reward_models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two one-label scorers of the tiny LM with different random heads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model.config.pad_token_id = tok.pad_token_id
        torch.nn.init.normal_(model.score.weight, std=1.0)
        path = tmp_path_factory.mktemp(f"rm{seed}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


def test_an_ensemble_scorer_gives_mean_minus_k_std_of_its_members_then_clips(
    reward_models: list[Path],
) -> None:
    prompts, completions = ["1+2=", "3+4=", "5+5="], ["3", "8", "10"]
    single = [RewardModelScorer(str(p)).score(prompts, completions) for p in reward_models]
    both = torch.tensor(single)  # [2, 3]
    assert not torch.allclose(both[0], both[1])  # the members disagree
    ensemble = RewardModelScorer([str(p) for p in reward_models], std_coef=1.0)
    mean, half_gap = both.mean(0), (both[0] - both[1]).abs() / 2  # population std of 2 values
    assert ensemble.score(prompts, completions) == pytest.approx(
        (mean - half_gap).tolist(), abs=1e-5
    )
    bound = float(both.abs().min()) / 2
    clipped = RewardModelScorer([str(p) for p in reward_models], clip=bound)
    got = clipped.score(prompts, completions)
    assert got == pytest.approx(mean.clamp(-bound, bound).tolist(), abs=1e-5)
    assert max(abs(v) for v in got) == pytest.approx(bound)


def test_fallen_metric_fires_after_k_falls_in_a_row() -> None:
    acc = [0.40, 0.50, 0.48, 0.46, 0.45]
    history = [{"eval/accuracy": a} for a in acc]
    watched = ("eval/accuracy", "eval/reward_model_auc")
    assert fallen_metric(history[:4], 3, watched) is None  # two falls only
    assert fallen_metric(history, 3, watched) == "eval/accuracy"
    assert fallen_metric(history, 4, watched) is None  # 0.40 -> 0.50 rose
    # a tie is not a fall; the AUC counts over the rows that have it
    flat = [{"eval/accuracy": 0.5}, {"eval/accuracy": 0.5}, {"eval/accuracy": 0.4}]
    assert fallen_metric(flat, 2, watched) is None
    auc = [
        {"eval/accuracy": 0.5, "eval/reward_model_auc": 0.8},
        {"eval/accuracy": 0.6},
        {"eval/accuracy": 0.7, "eval/reward_model_auc": 0.7},
        {"eval/accuracy": 0.8, "eval/reward_model_auc": 0.6},
    ]
    assert fallen_metric(auc, 2, watched) == "eval/reward_model_auc"
    assert watched_metrics("eval/accuracy") == watched
    assert watched_metrics("eval/reward_model_auc") == ("eval/reward_model_auc",)


def test_the_summary_names_where_the_rule_fired() -> None:
    rows = [{"counters/iteration": i, "loss": 0.0} for i in range(1, 11)]
    for i, a in zip((2, 4, 6, 8, 10), (0.40, 0.52, 0.50, 0.47, 0.45)):
        rows[i - 1]["eval/accuracy"] = a
    stop = overoptimization_stop(rows, 2, ("eval/accuracy",))
    assert stop == {
        "reason": "overoptimization",
        "iteration": 8,
        "metric": "eval/accuracy",
        "values": [0.52, 0.50, 0.47],
        "falls": 2,
    }
    assert overoptimization_stop(rows, 4, ("eval/accuracy",)) is None


def test_the_loop_watch_stops_and_marks_the_row() -> None:
    cfg = build_config(
        EXAMPLES / "arithmetic_rlhf.yaml", ["stop_on_overoptimization=2", "eval_every=5"]
    )
    watch = _OveroptimizationWatch(cfg, "eval/accuracy")
    ctx = LearnerContext()
    seen = []
    for acc, auc in ((0.4, 0.8), (0.5, 0.79), (0.6, 0.78), (0.55, 0.8), (0.5, 0.81)):
        row = {"eval/accuracy": acc, "eval/reward_model_auc": auc}
        seen.append((watch.stop(row, ctx), "stop/overoptimization" in row))
    # the AUC fell twice by the third evaluation although accuracy rose; then it rose, and
    # accuracy fell once (fourth), then twice (fifth)
    assert seen == [(False, False), (False, False), (True, True), (False, False), (True, True)]


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["lm.reward_model=[a, a]"], "lm.reward_model", "twice"),
        (["lm.reward_model=[]"], "lm.reward_model", "at least one"),
        (["lm.reward_model=a", "lm.reward_ensemble_std_coef=1"], "lm.reward_ensemble_std_coef", ">= 2"),
        (["lm.reward_model=[a, b]", "lm.reward_ensemble_std_coef=-1"], "lm.reward_ensemble_std_coef", ">= 0"),
        (["lm.reward_clip=0"], "lm.reward_clip", "> 0"),
        (["lm.reward_model=null", "lm.reward_clip=1"], "lm.reward_clip", "reward_model"),
        (["stop_on_overoptimization=0"], "stop_on_overoptimization", ">= 1"),
        (["stop_on_overoptimization=3", "eval_every=null"], "stop_on_overoptimization", "eval_every"),
        (["stop_on_overoptimization=3", "best_metric=reward/mean"], "stop_on_overoptimization", "training"),
    ],
)  # fmt: skip
def test_defence_config_errors_name_the_key(overrides: list[str], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        build_config(EXAMPLES / "arithmetic_rlhf.yaml", overrides)
    assert err.value.key.endswith(key)


def test_an_ensemble_member_that_does_not_exist_is_named_before_ray(
    reward_models: list[Path], tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    cfg = build_config(
        EXAMPLES / "arithmetic_rlhf.yaml",
        [f"lm.reward_model=[{reward_models[0]}, {missing}, {reward_models[1]}]"],
    )
    assert cfg.lm.reward_models == (str(reward_models[0]), str(missing), str(reward_models[1]))
    with pytest.raises(ConfigError, match="holds no reward model") as err:
        check_reward_fns(cfg)
    assert err.value.key == "lm.reward_model[1]" and str(missing) in str(err.value)
    single = build_config(EXAMPLES / "arithmetic_rlhf.yaml", [f"lm.reward_model={missing}"])
    with pytest.raises(ConfigError) as err:
        check_reward_fns(single)
    assert err.value.key == "lm.reward_model"


def test_ppo_whiten_rewards_makes_the_update_blind_to_the_rewards_offset_and_scale(
    model_dir: Path,
) -> None:
    """A Bradley-Terry score is defined up to an offset and a scale: with whiten_rewards,
    r and 5 r + 3 give the same PPO step (with the KL in the reward); without, they do not."""
    batch = make_batch(model_dir)
    batch.rewards = np.linspace(-1.0, 2.0, len(batch)).astype(np.float32)
    shifted = copy.deepcopy(batch)
    shifted.rewards = 5.0 * batch.rewards + 3.0

    def step(b, whiten: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        learner = make_learner(
            "lm_ppo", model_dir, f"lm_ppo.whiten_rewards={whiten}", "lm_ppo.kl_coef=0.05",
            "lm_ppo.num_epochs=1", "lm_ppo.micro_batch_size=64",
        )  # fmt: skip
        learner.update(b, progress=0.0)
        return {k: v.detach().clone() for k, v in learner.core.model.state_dict().items()}

    a, b = step(batch, True), step(shifted, True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c, d = step(batch, False), step(shifted, False)
    assert not all(torch.allclose(c[k], d[k], atol=1e-6) for k in c)


FADING_EVAL = """
CALLS = [0]


def fading(prompts, completions, metadata):
    # a held-out metric that falls at every evaluation: 1, 1/2, 1/3, ... in each actor
    CALLS[0] += 1
    return [1.0 / CALLS[0]] * len(completions)
"""


@pytest.mark.slow
def test_grpo_with_an_ensemble_clipped_stops_on_overoptimization_end_to_end(
    model_dir: Path, reward_models: list[Path], tmp_path: Path
) -> None:
    """``rlft-ray train`` of the shipped GRPO recipe with a two-member ensemble, a reward
    clip and the early stop, on a held-out metric made to fall at every evaluation."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "fadingeval.py").write_text(FADING_EVAL)
    out = tmp_path / "run"
    args = [
        "train",
        str(EXAMPLES / "arithmetic_rlhf.yaml"),
        f"lm.model={model_dir}",
        f"lm.reward_model=[{reward_models[0]},{reward_models[1]}]",
        "lm.reward_ensemble_std_coef=1.0",
        "lm.reward_clip=0.05",
        "lm.eval_fn=fadingeval:fading",
        "lm.num_samples=4",
        "lm.max_new_tokens=4",
        "total_iterations=8",
        "eval_every=1",
        "stop_on_overoptimization=2",
        "async_rollouts=false",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "rlft_ray", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    # evaluations 1, 1/2, 1/3: two falls in a row after the third iteration
    assert summary["iterations"] == 3 == len(rows)
    assert summary["early_stop"] == {
        "reason": "overoptimization",
        "iteration": 3,
        "metric": "eval/accuracy",
        "values": [1.0, 0.5, 0.3333],
        "falls": 2,
    }
    assert rows[-1]["stop/overoptimization"] == 1.0
    assert summary["checkpoint_best_score"]["iteration"] == 1  # before the fall
    assert summary["checkpoint_best_score"]["metric"] == "eval/accuracy"
    # the ensemble's rewards (mean - std of two random heads) are clipped to +-0.05
    for r in rows:
        assert abs(r["reward/mean"]) <= 0.05 + 1e-6 and r["reward/std"] <= 0.05 + 1e-6
    assert any(r["reward/std"] > 0 for r in rows)


def test_rlft_ray_eval_of_a_reward_model_still_reads_its_one_model(
    model_dir: Path, reward_models: list[Path], tmp_path: Path
) -> None:
    """``rlft-ray eval RM --dataset pairs``: the scorer's first member is the model scored."""
    import json

    from rlft_ray.learners.base import EvalOptions
    from rlft_ray.learners.reward_model import RewardModelLearner

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config(EXAMPLES / "arithmetic_rm.yaml", [f"lm.model={model_dir}"])
    out = RewardModelLearner.evaluate(reward_models[0], cfg, EvalOptions(dataset=str(pairs)))
    scores = RewardModelScorer(str(reward_models[0])).score(
        [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    assert out["pairs"] == 2
    assert out["pairwise_accuracy"] == pytest.approx(
        sum(c > r for c, r in zip(scores[:2], scores[2:])) / 2
    )
