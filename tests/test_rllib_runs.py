"""``algo: rllib`` end to end: CartPole PPO run, ``--resume``, ``init_from`` across the two
worlds (our PPO from RLlib's checkpoint, RLlib's PPO from ours), a multi-agent run.
Slow (each run starts Ray and RLlib) and skipped without RLlib."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.rllib")

from rlft_ray.cli import main
from rlft_ray.run.metrics import read_metrics

pytestmark = [pytest.mark.rllib, pytest.mark.slow]

SMALL = [
    "env.num_envs_per_runner=1",
    "rllib.config.train_batch_size_per_learner=400",
    "rllib.config.minibatch_size=100",
    "rllib.config.num_epochs=2",
    "rllib.config.model_config={fcnet_hiddens: [16, 16], fcnet_activation: tanh}",
    "checkpoint_every=1",
    "report_interval_s=0",
    "stop_return=null",
]


def _train(config: str, out, *overrides: str, resume: bool = False) -> dict:
    args = ["train", config, *overrides, "--output-dir", str(out), "--no-progress"]
    assert main([*args, "--resume"] if resume else args) == 0
    return json.loads((out / "summary.json").read_text())


def test_rllib_ppo_run_resume_and_init_from_both_ways(tmp_path) -> None:
    run = tmp_path / "rllib"
    summary = _train("examples/cartpole_rllib_ppo.yaml", run, *SMALL, "total_env_steps=800")
    assert summary["status"] == "completed" and summary["algo"] == "rllib"
    rows = read_metrics(run)
    assert [r["counters/iteration"] for r in rows] == [1.0, 2.0]
    assert [r["counters/env_steps"] for r in rows] == [400.0, 800.0]
    for key in ("rollout/episode_return_mean", "loss/policy", "loss/value", "perf/iteration_s"):
        assert key in rows[-1], key
    assert (run / "checkpoint_last" / "rllib" / "rllib_checkpoint.json").is_file()
    assert (run / "checkpoint_best" / "score.json").is_file()
    assert list((run / "tensorboard").iterdir())

    # --resume continues the counters from checkpoint_last
    _train("examples/cartpole_rllib_ppo.yaml", run, *SMALL, "total_env_steps=1200", resume=True)
    rows = read_metrics(run)
    assert [r["counters/iteration"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[-1]["counters/env_steps"] == 1200.0
    assert rows[-1]["counters/episodes"] > rows[1]["counters/episodes"]

    # rlft-ray eval builds the module from the run's config and reads the weights as data
    assert main(["eval", str(run / "checkpoint_last"), "--episodes", "2"]) == 0

    # our PPO starts from RLlib's module (mapped onto the actor-critic) ...
    ours = tmp_path / "ours"
    _train(
        "examples/cartpole_ppo.yaml",
        ours,
        "ppo.hidden_sizes=[16, 16]",
        "total_env_steps=256",
        "resources.num_rollout_actors=1",
        f"init_from={run}/checkpoint_last",
    )
    # ... and RLlib's PPO from our checkpoint (written as RLlib's default module)
    back = tmp_path / "back"
    summary = _train(
        "examples/cartpole_rllib_ppo.yaml",
        back,
        *SMALL,
        "total_env_steps=400",
        f"init_from={ours}/checkpoint_last",
    )
    assert summary["status"] == "completed"
    # a network that does not fit fails before Ray starts, naming the setting
    assert (
        main(
            [
                "train",
                "examples/cartpole_rllib_ppo.yaml",
                f"init_from={ours}/checkpoint_last",
                "--output-dir",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "bad").exists()


def test_multi_agent_navigation_per_agent_policies(tmp_path) -> None:
    out = tmp_path / "multi"
    _train(
        "examples/multi_nav_rllib_ppo.yaml",
        out,
        "rllib.policies=per_agent",
        "rllib.config.train_batch_size_per_learner=400",
        "rllib.config.minibatch_size=100",
        "rllib.config.num_epochs=1",
        "total_env_steps=400",
    )
    row = read_metrics(out)[-1]
    assert "rollout/agent_return_mean/agent_0" in row
    assert "rollout/agent_return_mean/agent_1" in row
    assert "loss/policy/agent_0" in row and "loss/policy/agent_1" in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agents"] == ["agent_0", "agent_1"]


def test_init_from_acts_as_the_pretrained_module_before_any_update(tmp_path) -> None:
    """``algo: rllib`` with ``init_from`` an RLlib module: before the first ``train()`` the
    learner's module and the env runner's (which samples the first batch) give the
    pretrained module's action logits and values, not a fresh init's."""
    import ray
    import torch
    from ray.rllib.algorithms.ppo import PPOConfig

    from rlft_ray.config import build_config
    from rlft_ray.learners.rllib import probe_env, register_rllib_env
    from rlft_ray.run.ray_session import init_ray, shutdown_ray
    from rlft_ray.run.rllib_init import check_init_from, restore_init_from
    from rlft_ray.run.rllib_run import _algo_config

    torch.manual_seed(3)
    spec = PPOConfig().get_default_rl_module_spec()
    cfg = build_config(
        "examples/cartpole_rllib_ppo.yaml",
        [*SMALL, f"init_from={tmp_path / 'module'}", "seed=11"],
    )
    env = probe_env(cfg)
    spec.observation_space, spec.action_space = env.observation, env.action
    spec.model_config = {**PPOConfig().model_config, "fcnet_hiddens": [16, 16]}
    pretrained = spec.build()
    pretrained.save_to_path(str(tmp_path / "module"))
    obs = torch.randn(32, 4)
    with torch.no_grad():
        want = pretrained.forward_inference({"obs": obs})["action_dist_inputs"]
        want_values = pretrained.compute_values({"obs": obs})

    algo_config = _algo_config(cfg, env)
    check_init_from(cfg, env, algo_config)
    init_ray(None)
    try:
        register_rllib_env()
        algo = algo_config.build_algo()
        try:
            fresh = algo.env_runner.module.forward_inference({"obs": obs})["action_dist_inputs"]
            assert not torch.allclose(fresh, want)  # a fresh init (seed 11) acts otherwise
            restore_init_from(algo, cfg, env)
            learner_module = algo.learner_group._learner.module["default_policy"]
            with torch.no_grad():
                runner = algo.env_runner.module.forward_inference({"obs": obs})
                learner = learner_module.forward_inference({"obs": obs})
                values = learner_module.compute_values({"obs": obs})
            torch.testing.assert_close(runner["action_dist_inputs"], want)
            torch.testing.assert_close(learner["action_dist_inputs"], want)
            torch.testing.assert_close(values, want_values)
        finally:
            algo.stop()
    finally:
        shutdown_ray()
        assert not ray.is_initialized()
