"""Rejection sampling on local embedded Ray: an RSFT run with held-out accuracy per round,
the `rlft-ray sample` job (resume without duplicates), and filtered behaviour cloning
started from a PPO checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlft_ray.apps.sample import PARTS, run_sampling
from rlft_ray.cli import main
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import LearnerContext, Spaces
from rlft_ray.learners.ppo import PPOLearner
from rlft_ray.rollout.env_runner import probe_spaces
from rlft_ray.run.driver import RunError, run_training
from rlft_ray.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = ROOT / "data"


pytestmark = pytest.mark.usefixtures("local_ray")


def _rsft(model_dir: Path, *overrides: str):
    return build_config(
        EXAMPLES / "arithmetic_rsft.yaml",
        [
            f"lm.model={model_dir}",
            f"lm.prompts={DATA / 'arith_train.jsonl'}",
            f"lm.eval_prompts={DATA / 'arith_test.jsonl'}",
            "lm.reward_fn=envs.arithmetic:digit_fraction",  # graded: a random model can learn
            "lm.max_new_tokens=4",
            "lm.num_samples=4",
            "lm.prompts_per_iteration=16",
            "rsft.min_reward=null",
            "rsft.top_k=1",
            "rsft.optim.lr=3e-3",
            "rsft.num_epochs=2",
            "checkpoint_every=5",
            "eval_every=3",
            "seed=1",
            *overrides,
        ],
    )


@pytest.mark.slow  # 35 s; test_rsft.py's quickstart run keeps RSFT end to end in the default suite
def test_rsft_run_selects_on_actors_and_learns(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    summary = run_training(_rsft(model_dir, "rsft.rounds=15"), out, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 16))
    # best-of-4, one per prompt: exactly a quarter of every round crosses to the learner
    assert all(r["rollout/accept_rate"] == 0.25 for r in rows)
    assert all(r["rollout/accepted"] == 16 and r["rollout/generated"] == 64 for r in rows)
    assert all(r["rollout/reward_mean_accepted"] >= r["rollout/reward_mean_all"] for r in rows)
    assert all(r["perf/accepted_per_s"] > 0 and r["perf/samples_per_s"] > 0 for r in rows)
    rewards = [r["reward/mean"] for r in rows]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.05, rewards
    # held-out exact-match every 3 rounds and after the last one, on every actor's weights
    evals = [r["counters/iteration"] for r in rows if "eval/accuracy" in r]
    assert evals == [3, 6, 9, 12, 15]
    assert summary["env_steps"] == 15 * 64 and summary["error"] is None
    assert summary["policy_version"] == 15
    assert (out / "checkpoint_last" / "policy" / "config.json").is_file()


@pytest.mark.slow  # the rule is unit-tested in test_rsft.py; this checks it reaches the CLI error
def test_a_selection_that_never_accepts_stops_with_a_clear_error(
    model_dir: Path, tmp_path: Path
) -> None:
    cfg = _rsft(
        model_dir,
        "lm.reward_fn=envs.arithmetic:exact_match",  # a random model is never right
        "rsft.min_reward=1.0",
        "rsft.max_empty_rounds=2",
        "rsft.rounds=10",
        "eval_every=null",
        "report_interval_s=0",  # every round reports: the first empty one is in the metrics
    )
    with pytest.raises(RunError, match="EmptyRoundsError: 2 rounds in a row accepted no sample"):
        run_training(cfg, tmp_path / "e", progress=False)
    rows = read_metrics(tmp_path / "e")
    # the first empty round is reported, the second stops the run before its report
    assert [r["rollout/empty_rounds"] for r in rows] == [1.0]


def _bon_overrides(model_dir: Path, prompts: Path) -> list[str]:
    return [
        f"lm.model={model_dir}",
        f"lm.prompts={prompts}",
        "lm.reward_fn=envs.arithmetic:digit_fraction",
        "lm.num_samples=4",
        "lm.max_new_tokens=4",
        "rsft.min_reward=null",
        "resources.cpus_per_rollout_actor=0.5",
    ]


def _bon(model_dir: Path, prompts: Path, *overrides: str):
    return build_config(
        EXAMPLES / "arithmetic_bon.yaml", [*_bon_overrides(model_dir, prompts), *overrides]
    )


def test_sample_job_writes_the_accepted_set_and_resumes_without_duplicates(
    model_dir: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = (DATA / "arith_train.jsonl").read_text().splitlines()[:40]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bon"
    summary = run_sampling(_bon(model_dir, prompts), out, prompts_per_batch=8, progress=False)
    assert (summary["prompts"], summary["samples"], summary["accepted"]) == (40, 160, 40)
    assert (
        summary["accept_rate"] == 0.25
        and summary["reward_mean_accepted"] >= summary["reward_mean_all"]
    )
    accepted = pd.read_json(out / "accepted.jsonl", lines=True)
    assert list(accepted.columns[:5]) == [
        "prompt",
        "completion",
        "reward",
        "logprob",
        "policy_version",
    ]
    assert accepted["prompt_index"].tolist() == list(range(40))  # one per prompt, in order
    assert set(accepted["policy_version"]) == {0}  # lm.model as loaded
    assert accepted["prompt"].tolist() == [json.loads(x)["prompt"] for x in lines]
    assert len(list((out / PARTS).glob("part-*.parquet"))) == 5
    rows = pd.concat([pd.read_parquet(p) for p in (out / PARTS).glob("part-*.parquet")])
    assert len(rows) == summary["samples"] and rows["reward"].notna().all()
    # every sample is counted; only the accepted ones carry their text
    assert rows.loc[rows["accepted"], "completion"].notna().all()
    assert rows.loc[~rows["accepted"], ["prompt", "completion", "metadata"]].isna().all().all()

    # a second job into the same directory is refused, before any sampling
    with pytest.raises(ConfigError, match="--output-dir: .* is not empty"):
        run_sampling(_bon(model_dir, prompts), out, progress=False)
    # a stop after some batches (two parts lost): --resume samples only those prompts
    parts = sorted((out / PARTS).glob("part-*.parquet"))
    for part in parts[1:3]:
        part.unlink()
    # --resume through the CLI, this time also writing parquet
    code = main(
        [
            "sample",
            str(EXAMPLES / "arithmetic_bon.yaml"),
            *_bon_overrides(model_dir, prompts),
            "--output-dir",
            str(out),
            "--resume",
            "--format",
            "parquet",
            "--prompts-per-batch",
            "8",
            "--no-progress",
        ]
    )
    again = json.loads((out / "summary.json").read_text())
    assert code == 0 and again["sampled_this_run"] == 16 * 4 and again["samples"] == 160
    resumed = pd.read_parquet(out / "accepted.parquet")
    assert resumed["prompt_index"].tolist() == list(range(40))
    # every batch is seeded by its first prompt: the resumed set is the same set
    pd.testing.assert_frame_equal(resumed, accepted, check_dtype=False)
    with pytest.raises(ConfigError, match="--resume: the config differs"):
        run_sampling(_bon(model_dir, prompts, "lm.num_samples=2"), out, resume=True, progress=False)


@pytest.mark.slow  # 26 s and 21 s: the default suite stays under 10 minutes, with
# test_core_components.py's filtered-BC updates (both action types) in it
@pytest.mark.parametrize(
    "env",
    [
        ["env.id=CartPole-v1"],
        [
            "env.id=rlft/Navigation-v0",
            "env.kwargs={action_type: continuous}",
            "env.max_episode_steps=20",
        ],
    ],
    ids=["discrete", "continuous"],
)
def test_filtered_bc_fine_tunes_a_ppo_checkpoint(tmp_path: Path, env: list[str]) -> None:
    from safetensors.torch import load_file

    import envs  # noqa: F401  (registers rlft/Navigation-v0)

    # a PPO checkpoint as `rlft-ray train examples/*_ppo.yaml` writes one
    ppo_cfg = build_config(overrides=["algo=ppo", *env])
    spaces = Spaces(*probe_spaces(ppo_cfg.env))
    ppo = PPOLearner(ppo_cfg, spaces, LearnerContext())
    ckpt.save_checkpoint(
        tmp_path / "ppo", ppo.modules(), ppo.optimizer, ckpt.Counters(), ppo_cfg, spaces.signature()
    )
    cfg = build_config(
        overrides=[
            "algo=filtered_bc",
            *env,
            f"init_from={tmp_path / 'ppo'}",
            "filtered_bc.episodes_per_actor=8",
            "total_iterations=2",
            "resources.num_rollout_actors=2",
        ]
    )
    summary = run_training(cfg, tmp_path / "bc", progress=False)
    rows = read_metrics(tmp_path / "bc")
    assert summary["error"] is None and len(rows) == 2
    hp = cfg.filtered_bc
    for r in rows:
        # 2 actors keep the top quarter (rounded up) of their at least 8 episodes each
        n = r["rollout/episodes_collected"]
        assert n >= 16 and 0.25 <= r["rollout/accept_rate"] <= 0.25 + 2 / n
        assert r["rollout/return_mean_accepted"] > r["rollout/return_mean_all"]
        # the kept steps were imitated: every epoch's minibatches took an optimizer step
        assert r["rollout/accepted_steps"] > 0
        assert r["optim/steps"] == hp.num_epochs * hp.num_minibatches
        assert np.isfinite(r["loss/bc_nll"]) and r["loss/grad_norm"] > 0
        assert r["perf/env_steps_per_s"] > 0
    # the run started from the PPO policy and moved it (the learning itself, the NLL of
    # the kept actions falling, is test_core_components' filtered-BC update test)
    start = load_file(str(tmp_path / "ppo" / "policy.safetensors"))
    final = load_file(str(tmp_path / "bc" / "checkpoint_last" / "policy.safetensors"))
    assert start.keys() == final.keys()
    moved = [k for k in start if not np.allclose(start[k].numpy(), final[k].numpy())]
    assert moved and all((start[k] - final[k]).abs().max() < 0.5 for k in start)
    assert (tmp_path / "bc" / "checkpoint_best" / "policy.safetensors").is_file()
    if env[0] != "env.id=CartPole-v1":
        return
    # a checkpoint of another network is refused before Ray starts, naming the tensors
    dqn = build_config(overrides=["algo=dqn", f"init_from={tmp_path / 'ppo'}"])
    with pytest.raises(
        ckpt.CheckpointError, match=r"its policy does not fit .* missing \['epsilon'"
    ):
        run_training(dqn, tmp_path / "dqn", progress=False)
    assert not (tmp_path / "dqn" / "config.yaml").exists()
