"""LM runs on local embedded Ray: weight sync to generation actors, a short GRPO run, resume, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from rlft_ray.cli import main
from rlft_ray.config import ConfigError, build_config
from rlft_ray.lm.loading import load_model_and_tokenizer
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.group import RunnerGroup, make_remote_runners
from rlft_ray.run.driver import run_training
from rlft_ray.run.metrics import read_metrics
from rlft_ray.types import UNSYNCED_VERSION, Prompt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = Path(__file__).resolve().parent.parent / "data"


pytestmark = pytest.mark.usefixtures("local_ray")


def _actors_and_other_model(
    model_dir: Path, tmp_path: Path, count: int, max_restarts: int, prefix: str
) -> tuple[list, torch.nn.Module, Any]:
    """``count`` generation actors on ``model_dir`` and another tiny model to publish."""
    other_dir = make_tiny_model(
        tmp_path / "other", n_layer=1, hidden=32, n_head=2, max_positions=64, seed=5
    )
    cfg = build_config(
        EXAMPLES / "arithmetic_grpo.yaml", [f"lm.model={model_dir}", "lm.num_samples=2"]
    )
    actors = make_remote_runners(
        GenerationActor,
        count,
        0.5,
        max_restarts,
        prefix,
        kwargs_for=lambda i: {"lm": cfg.lm, "seed": i},
    )
    new, tok = load_model_and_tokenizer(other_dir)
    return actors, new, tok


def _assert_sampled_by(model: torch.nn.Module, batch: Any) -> None:
    """The batch's recorded log-probs are ``model``'s."""
    t = [
        torch.tensor(x)
        for x in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    ]
    new_lp = response_forward(PolicyWithValueHead(model.eval()), *t).logprobs
    assert torch.allclose(new_lp[t[3]], torch.tensor(batch.logprobs)[t[3]], atol=1e-4)


def test_weight_sync_reaches_every_actor(model_dir: Path, tmp_path: Path) -> None:
    actors, new, tok = _actors_and_other_model(model_dir, tmp_path, 2, 0, "test-gen-")
    try:
        group = RunnerGroup(actors, mine=[0, 1])
        prompts = [Prompt(t, tok(t)["input_ids"], {"answer": "0"}) for t in ("1+2=", "33+4=")]
        sync_s = group.publish({k: v.clone() for k, v in new.state_dict().items()}, version=5)
        assert sync_s > 0 and ray.get([a.get_version.remote() for a in actors]) == [5, 5]
        batches = group.sample(lambda: ({}, 0), per_actor=[(prompts,), (prompts[:1],)])
        assert [b.policy_version for b in batches] == [5, 5] and [len(b) for b in batches] == [4, 2]
        for b in batches:  # the actors now sample from the published weights
            _assert_sampled_by(new, b)
        # the loads' own seconds are read back once each (perf/weight_load_s)
        assert 0 < group.load_seconds() < 60 and group.load_seconds() == 0.0
        group.publish({k: v.clone() for k, v in new.state_dict().items()}, 6, wait=False)
        group.sample(lambda: ({}, 0), per_actor=[(prompts,), (prompts,)], version=6)
        assert group.load_seconds() > 0  # done before the sample that followed it
    finally:
        for a in actors:
            ray.kill(a)


def test_an_actor_restarted_before_it_holds_version_0_is_restored_not_trusted(
    model_dir: Path, tmp_path: Path
) -> None:
    """Iteration 0 of an ``init_from`` run publishes version 0. A generation actor Ray
    restarts comes back with ``lm.model``'s weights and must not pass for one holding it."""
    actors, new, tok = _actors_and_other_model(model_dir, tmp_path, 1, 1, "test-restart-")
    try:
        weights = {k: v.clone() for k, v in new.state_dict().items()}
        group = RunnerGroup(actors, mine=[0])
        group.publish(weights, version=0)
        ray.kill(actors[0], no_restart=False)  # Ray restarts it with lm.model's weights
        deadline = time.monotonic() + 60
        while True:  # ray.kill is asynchronous: wait until the restarted actor answers
            try:
                if ray.get(actors[0].get_version.remote(), timeout=10) == UNSYNCED_VERSION:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, "the killed actor did not come back"
            time.sleep(0.1)
        prompts = [Prompt(t, tok(t)["input_ids"], {"answer": "0"}) for t in ("1+2=", "33+4=")]
        (batch,) = group.sample(lambda: (weights, 0), per_actor=[(prompts,)], version=0)
        assert group.restarts == 1 and batch.policy_version == 0
        _assert_sampled_by(new, batch)
    finally:
        for a in actors:
            ray.kill(a)


def test_grpo_reward_rises_then_resumes(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    overrides = [
        f"lm.model={model_dir}",
        "lm.reward_fn=envs.arithmetic:digit_fraction",  # dense reward a random model can learn
        "lm.max_new_tokens=4",
        "lm.num_samples=4",
        "lm.prompts_per_iteration=8",
        "grpo.optim.lr=3e-3",
        "grpo.kl_coef=0.01",
        "grpo.micro_batch_size=16",  # 2 micro-batches per step
        "checkpoint_every=12",
        "seed=1",
    ]
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=24"])
    summary = run_training(cfg, out, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 25))
    rewards = [r["reward/mean"] for r in rows]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1, rewards
    for key in (
        "kl/mean",
        "loss/policy",
        "perf/tokens_per_s",
        "perf/weight_sync_s",
        "perf/learner_tokens_per_s",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    # the sync is the learner's publish plus the actors' loads (read back when done)
    for r in rows:
        assert r["perf/weight_sync_s"] == r["perf/weight_publish_s"] + r["perf/weight_load_s"]
    assert sum(r["perf/weight_load_s"] > 0 for r in rows) >= 20
    assert rows[-1]["kl/mean"] > rows[0]["kl/mean"]  # the policy moved away from the reference
    # the example overlaps sampling with the update: each batch is one version behind
    assert [r["rollout/policy_lag"] for r in rows] == [0.0] + [1.0] * 23
    assert summary["policy_version"] == 24 and summary["env_steps"] == 24 * 32
    assert summary["data/kept"] == 2000 and summary["error"] is None
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "reward_curve.png"):
        assert (out / name).is_file(), name
    # checkpoints are save_pretrained directories
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (
        json.loads((out / "checkpoint_last" / "state.json").read_text())["counters"]["iteration"]
        == 24
    )
    AutoModelForCausalLM.from_pretrained(out / "checkpoint_best" / "policy")
    AutoTokenizer.from_pretrained(out / "checkpoint_best" / "policy")

    # --resume continues counters and metrics from checkpoint_last
    more = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=30"])
    summary = run_training(more, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 31))
    assert summary["policy_version"] == 30
    assert np.mean([r["reward/mean"] for r in rows[-5:]]) > np.mean(rewards[:5])


@pytest.mark.slow
def test_lora_run_with_two_learners_resumes_seeds_and_exports(
    model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    overrides = [
        f"lm.model={model_dir}",
        "lm.reward_fn=envs.arithmetic:digit_fraction",
        "lm.max_new_tokens=4",
        "lm.num_samples=4",
        "lm.prompts_per_iteration=8",
        "lm.lora.r=8",
        "lm.lora.alpha=16",
        "grpo.optim.lr=1e-2",
        "grpo.kl_coef=0.01",
        "resources.num_learners=2",
        "resources.cpus_per_learner=0.5",
        "checkpoint_every=10",
        "seed=1",
        "async_rollouts=false",  # the actors sample with the learner's current adapters
    ]
    cfg = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=20"])
    run_training(cfg, out, progress=False)
    rows = read_metrics(out)
    # kl/mean is KL(the actors' sampling policy || adapters off): it grows only because the
    # actors sample with the published adapters; and the learner's log-probs under its own
    # adapters equal the actors' (approx_kl ~ 0), so both hold the same policy
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)
    assert np.mean([r["kl/mean"] for r in rows[-5:]]) > 1e-3
    assert max(r["loss/approx_kl"] for r in rows) < 1e-4
    full_mb = sum(p.numel() * 4 for p in load_model_and_tokenizer(model_dir)[0].parameters()) / 1e6
    assert 0 < rows[-1]["perf/weight_sync_mb"] < full_mb / 4  # adapters only
    assert (out / "checkpoint_last" / "policy" / "adapter_model.safetensors").is_file()

    more = build_config(EXAMPLES / "arithmetic_grpo.yaml", [*overrides, "total_iterations=24"])
    assert run_training(more, out, resume=True, progress=False)["policy_version"] == 24
    assert [r["counters/iteration"] for r in read_metrics(out)] == list(range(1, 25))

    seeded = build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [
            *overrides,
            "resources.num_learners=1",
            f"init_from={out / 'checkpoint_last'}",
            "total_iterations=2",
        ],
    )
    rows = (
        run_training(seeded, tmp_path / "seeded", progress=False),
        read_metrics(tmp_path / "seeded"),
    )[1]
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # reference: init_from's policy
    assert main(["export", str(out / "checkpoint_last"), str(tmp_path / "merged")]) == 0
    model, _ = load_model_and_tokenizer(tmp_path / "merged")
    assert not any("lora" in k for k in model.state_dict())


def test_reward_error_is_found_on_one_row_before_ray(model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "no_answers.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(16)))
    cfg = build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [
            f"lm.model={model_dir}",
            f"lm.prompts={prompts}",
            "lm.eval_prompts=null",
            "total_iterations=2",
        ],
    )
    with pytest.raises(
        ConfigError,
        match=r"lm.reward_fn: fails on the first prompt of .*no_answers.jsonl: reward function "
        r"envs.arithmetic:exact_match raised ValueError: metadata\[0\] has no 'answer' key",
    ):
        run_training(cfg, tmp_path / "err", progress=False)
    assert not (tmp_path / "err").exists()  # no half-made run directory
