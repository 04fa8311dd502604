"""Env runner, learners, checkpoints and resource checks as plain objects (no Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rlft_ray.config import build_config
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import LearnerContext, NonFiniteLossError, Spaces
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.rollout.env_runner import EnvRunner, evaluate_policy, probe_spaces
from rlft_ray.run.resources import ResourceError, check_fits
from rlft_ray.types import UNSYNCED_VERSION, RolloutBatch


def _setup(overrides: list[str]):
    cfg = build_config(None, overrides)
    spaces = Spaces(*probe_spaces(cfg.env))
    cls = get_learner_cls(cfg.algo)
    return cfg, spaces, cls


def test_env_runner_batch_shapes_and_time_limit_bootstrap() -> None:
    cfg, _spaces, cls = _setup(
        ["env.max_episode_steps=10", "env.num_envs_per_runner=3", "ppo.rollout_steps=25"]
    )
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    batch = runner.sample()
    assert batch.obs.shape == (25, 3, 4) and batch.next_obs.shape == (25, 3, 4)
    assert batch.actions.shape == (25, 3) and batch.actions.dtype == np.int64
    assert batch.logprobs.shape == batch.values.shape == batch.rewards.shape == (25, 3)
    assert batch.last_values.shape == (3,)
    assert batch.num_steps == 75
    # next_obs is the true successor: equal to the following obs except where an episode ended
    same = np.isclose(batch.next_obs[:-1], batch.obs[1:]).all(axis=-1)
    ended = batch.terminated[:-1] | batch.truncated[:-1]
    assert same[~ended].all()
    # time-limit truncations carry V(final obs); others carry nothing
    assert batch.truncated.any()
    assert (batch.bootstrap_values[~batch.truncated] == 0).all()
    assert (batch.bootstrap_values[batch.truncated & ~batch.terminated] != 0).all()
    # each finished episode is reported once, with its length <= the time limit
    assert len(batch.episodes.returns) == int((batch.terminated | batch.truncated).sum())
    assert all(1 <= n <= 10 for n in batch.episodes.lengths)
    assert batch.episodes.returns == [
        float(n) for n in batch.episodes.lengths
    ]  # CartPole: +1 per step


def test_runner_weights_and_version() -> None:
    cfg, spaces, cls = _setup([])
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    learner = cls(cfg, spaces, LearnerContext())
    with torch.no_grad():
        for p in learner.policy.parameters():
            p.add_(1.0)
    assert runner.set_weights(learner.policy_state(), 5) == 5
    assert runner.sample(4).policy_version == 5
    for a, b in zip(runner.policy.state_dict().values(), learner.policy.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_concat_joins_env_axis_and_keeps_oldest_version() -> None:
    cfg, _spaces, cls = _setup(["env.num_envs_per_runner=2"])
    a = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    b = EnvRunner(**cls.sampler_kwargs(cfg, 1))
    a.policy_version, b.policy_version = 2, 3
    joined = RolloutBatch.concat([a.sample(8), b.sample(8)])
    assert joined.obs.shape == (8, 4, 4) and joined.last_values.shape == (4,)
    assert joined.policy_version == 2


def test_a_runner_holds_no_version_until_weights_arrive() -> None:
    cfg, _spaces, cls = _setup([])
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    assert runner.sample(4).policy_version == UNSYNCED_VERSION == -1


def test_ppo_update_runs_and_reports_namespaced_metrics() -> None:
    cfg, spaces, cls = _setup(["seed=3"])
    learner = cls(cfg, spaces, LearnerContext())
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    metrics = learner.update(runner.sample(), progress=0.0)
    for key in (
        "loss/policy",
        "loss/value",
        "loss/entropy",
        "loss/approx_kl",
        "loss/clip_frac",
        "loss/grad_norm",
        "optim/lr",
    ):
        assert key in metrics and np.isfinite(metrics[key])
    assert metrics["optim/lr"] == pytest.approx(cfg.ppo.lr)
    # linear annealing: halfway through the budget the lr is halved
    assert learner.update(runner.sample(), progress=0.5)["optim/lr"] == pytest.approx(
        cfg.ppo.lr / 2
    )


def test_nan_guard_stops_before_the_optimizer_step() -> None:
    cfg, spaces, cls = _setup([])
    learner = cls(cfg, spaces, LearnerContext())
    batch = EnvRunner(**cls.sampler_kwargs(cfg, 0)).sample()
    batch.rewards[3, 1] = np.nan
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"loss/total became nan"):
        learner.update(batch, progress=0.0)
    for k, v in learner.policy.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_dqn_learner_waits_for_learning_starts_then_updates_target() -> None:
    cfg, spaces, cls = _setup(
        [
            "algo=dqn",
            "dqn.learning_starts=100",
            "dqn.target_update_interval=4",
            "dqn.updates_per_iteration=4",
            "dqn.rollout_steps=16",
        ]
    )
    learner = cls(cfg, spaces, LearnerContext())
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    first = learner.update(runner.sample(), progress=0.0)  # 64 transitions < 100
    assert "loss/td" not in first and first["replay/size"] == 64
    second = learner.update(runner.sample(), progress=0.15)
    assert second["replay/size"] == 128 and np.isfinite(second["loss/td"])
    # eps decays linearly: 1.0 -> 0.02 over 30 % of the run; at 15 % it is halfway
    assert second["explore/epsilon"] == pytest.approx(1.0 + 0.5 * (0.02 - 1.0))
    assert float(learner.policy_state()["epsilon"]) == pytest.approx(second["explore/epsilon"])
    # 4 gradient steps with target interval 4 -> target equals online after the update
    for t, o in zip(learner.target.parameters(), learner.q.parameters()):
        torch.testing.assert_close(t, o)


def test_checkpoint_round_trip_and_compatibility_errors(tmp_path: Path) -> None:
    cfg, spaces, cls = _setup(["seed=11"])
    learner = cls(cfg, spaces, LearnerContext())
    learner.update(EnvRunner(**cls.sampler_kwargs(cfg, 0)).sample(), progress=0.0)
    counters = ckpt.Counters(
        iteration=7, env_steps=3584, policy_version=7, episodes=12, recent_returns=[10.0, 20.0]
    )
    path = tmp_path / "ck"
    ckpt.save_checkpoint(
        path, learner.modules(), learner.optimizer, counters, cfg, spaces.signature()
    )
    assert (path / "policy.safetensors").is_file() and (path / "config.yaml").is_file()

    fresh = cls(cfg, spaces, LearnerContext())
    ckpt.load_modules(path, fresh.modules())
    restored = ckpt.load_training_state(path, fresh.optimizer)
    assert restored == counters
    for a, b in zip(fresh.policy.parameters(), learner.policy.parameters()):
        torch.testing.assert_close(a, b)
    assert ckpt.load_config_from_checkpoint(path) == cfg

    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found: .*missing"):
        ckpt.read_state(tmp_path / "missing")
    dqn_cfg = build_config(None, ["algo=dqn"])
    with pytest.raises(
        ckpt.CheckpointError, match=r"does not fit this run: algo is 'ppo' there, 'dqn' here"
    ):
        ckpt.check_compatible(path, dqn_cfg, spaces.signature())
    nav = build_config(None, ["env.id=rlft/Navigation-v0", "env.kwargs={action_type: discrete}"])
    nav_spaces = Spaces(*probe_spaces(nav.env))
    with pytest.raises(
        ckpt.CheckpointError, match=r"action space is Discrete\(2\) there, Discrete\(8\) here"
    ):
        ckpt.check_compatible(path, nav, nav_spaces.signature())
    wide = build_config(None, ["ppo.hidden_sizes=[32,32]"])
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"policy\.actor\.0\.(weight|bias) has shape \(64.*\), this run.s model has \(32",
    ):
        ckpt.load_modules(path, cls(wide, spaces, LearnerContext()).modules())


def test_evaluate_policy_greedy_is_deterministic() -> None:
    cfg, spaces, cls = _setup(
        ["env.id=rlft/Navigation-v0", "env.kwargs={action_type: discrete, goal: [0.5, 0.5]}"]
    )
    policy = cls.make_policy(cfg, spaces)
    a = evaluate_policy(policy, cfg.env, 3, seed=1)
    b = evaluate_policy(policy, cfg.env, 3, seed=1)
    assert a.returns == b.returns and len(a.successes) == 3


def test_check_fits_names_the_numbers() -> None:
    res = build_config(
        None, ["resources.num_rollout_actors=4", "resources.num_learners=2"]
    ).resources
    with pytest.raises(
        ResourceError,
        match=r"needs 4 CPUs \(4 rollout actors x 0.5 \+ 2 learners x 1\), cluster has 2",
    ):
        check_fits(res, {"CPU": 2.0})
    check_fits(res, {"CPU": 4.0})
    gpu = build_config(None, ["resources.use_gpu=true"]).resources
    with pytest.raises(ResourceError, match=r"use_gpu=true needs 1 GPU\(s\).*cluster has 0"):
        check_fits(gpu, {"CPU": 8.0})


def test_probe_spaces_rejects_unknown_env() -> None:
    cfg = build_config(None, ["env.id=CartPol-v1"])
    with pytest.raises(ValueError, match="env.id='CartPol-v1'"):
        probe_spaces(cfg.env)


def test_replay_buffer_wraps_and_round_trips_with_its_sampler() -> None:
    from rlft_ray.learners.dqn import ReplayBuffer

    buf = ReplayBuffer(capacity=5, obs_shape=(2,), seed=0)
    for start in (0, 3):  # 3 then 4 transitions: the ring wraps, 0..1 are overwritten
        n = 3 if start == 0 else 4
        ids = np.arange(start, start + n, dtype=np.float32)
        buf.add(
            np.stack([ids, ids], axis=1),
            ids.astype(np.int64),
            ids,
            np.stack([ids + 1, ids + 1], axis=1),
            np.zeros(n, dtype=np.float32),
        )
    assert len(buf) == 5 and buf.pos == 2
    state = buf.state_dict()
    np.testing.assert_array_equal(state["rewards"], [5, 6, 2, 3, 4])  # ring layout, pos 2
    np.testing.assert_array_equal(state["next_obs"][:, 0], [6, 7, 3, 4, 5])

    restored = ReplayBuffer(capacity=5, obs_shape=(2,), seed=123)
    restored.load_state_dict(state)
    for a, b in zip(buf.sample(8), restored.sample(8)):  # same transitions, same draws
        np.testing.assert_array_equal(a, b)
    smaller = ReplayBuffer(capacity=3, obs_shape=(2,), seed=0)
    smaller.load_state_dict(state)
    np.testing.assert_array_equal(smaller.rewards, [4, 5, 6])  # the newest 3, in order
    assert smaller.pos == 0 and len(smaller) == 3
    with pytest.raises(ValueError, match="shape"):
        ReplayBuffer(capacity=5, obs_shape=(3,), seed=0).load_state_dict(state)


def test_dqn_rank_state_restores_replay_and_grad_steps() -> None:
    cfg, spaces, cls = _setup(["algo=dqn", "dqn.learning_starts=32", "dqn.rollout_steps=16"])
    learner = cls(cfg, spaces, LearnerContext())
    learner.update(EnvRunner(**cls.sampler_kwargs(cfg, 0)).sample(), progress=0.0)
    state = learner.rank_state()
    fresh = cls(cfg, spaces, LearnerContext())
    fresh.load_rank_state(state)
    assert len(fresh.replay) == len(learner.replay) == 64
    assert fresh.grad_steps == learner.grad_steps == cfg.dqn.updates_per_iteration
    np.testing.assert_array_equal(fresh.replay.obs[:64], learner.replay.obs[:64])


def test_rank_state_files_must_match_the_number_of_learners(tmp_path: Path) -> None:
    ckpt.save_rank_states(tmp_path, [{"x": np.arange(3)}, {"x": np.arange(2)}])
    np.testing.assert_array_equal(ckpt.load_rank_state(tmp_path, 1, 2)["x"], [0, 1])
    with pytest.raises(ckpt.CheckpointError, match="2 learner rank.*num_learners=1"):
        ckpt.load_rank_state(tmp_path, 0, 1)
    ckpt.save_rank_states(tmp_path / "none", [{}])  # learners without rank state write nothing
    assert ckpt.load_rank_state(tmp_path / "none", 0, 1) is None


def test_hold_threads_keeps_torch_and_the_tokenizer_to_the_cpus_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlft_ray.core.torch_utils import hold_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    try:
        hold_threads(1)
        assert torch.get_num_threads() == 1
        assert (os.environ["RAYON_NUM_THREADS"], os.environ["TOKENIZERS_PARALLELISM"]) == (
            "1",
            "false",
        )
    finally:
        torch.set_num_threads(before)


def test_gym_heldout_evaluation_splits_episodes_over_runners_on_unused_seeds() -> None:
    from rlft_ray.learners.base import HELDOUT_SEED

    cfg = build_config(
        overrides=["algo=ppo", "env.id=CartPole-v1", "eval_every=5", "eval_episodes=5", "seed=3"]
    )
    cls = get_learner_cls("ppo")
    learner = cls(cfg, cls.probe(cfg).spaces, LearnerContext(0, 1))
    requests = learner.heldout_requests(2)
    assert requests == [(3, HELDOUT_SEED + 3), (2, HELDOUT_SEED + 6)]  # 5 episodes, no overlap
    runner = EnvRunner(**cls.sampler_kwargs(cfg, 0))
    runner.set_weights(learner.policy_state(), 0)
    (version, first), (_, again) = (runner.heldout_scores(*requests[0]) for _ in range(2))
    assert version == 0 and len(first.returns) == 3
    assert first.returns == again.returns  # greedy on fixed seeds: repeatable
    second = runner.heldout_scores(*requests[1])[1]
    metrics = learner.heldout_metrics([first, second])
    assert metrics["eval/return_mean"] == pytest.approx(np.mean(first.returns + second.returns))


def test_fused_optimizer_takes_the_same_steps_and_falls_back_without_a_kernel() -> None:
    from rlft_ray.core.torch_utils import fused_optimizer

    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    fused_w, plain_w = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fused = fused_optimizer(torch.optim.AdamW, [fused_w], lr=0.1, weight_decay=0.01)
    plain = torch.optim.AdamW([plain_w], lr=0.1, weight_decay=0.01)
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    for step in range(3):
        for w, opt in ((fused_w, fused), (plain_w, plain)):
            opt.zero_grad()
            ((w - step) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(fused_w, plain_w)

    class NoKernel(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            if kwargs.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be ... supported")
            super().__init__(params, **kwargs)

    fallback = fused_optimizer(NoKernel, [torch.nn.Parameter(w0.clone())], lr=0.1)
    assert not fallback.param_groups[0]["fused"]


def test_filtered_bc_refuses_an_episode_with_a_nan_return() -> None:
    import envs  # noqa: F401  (registers rlft/NaNReward-v0)
    from rlft_ray.rewards import RewardError

    cfg, _spaces, cls = _setup(
        [
            "algo=filtered_bc",
            "env.id=rlft/NaNReward-v0",
            "env.kwargs={nan_after_steps: 3}",
            "env.max_episode_steps=10",
            "env.num_envs_per_runner=2",
            "filtered_bc.episodes_per_actor=2",
        ]
    )
    collector = cls.sampler(cfg)(**cls.sampler_kwargs(cfg, 0))
    with pytest.raises(RewardError, match=r"episode \d+ of .* has return nan"):
        collector.sample()


def test_filtered_bc_imitates_the_clipped_action_the_env_executed() -> None:
    import envs  # noqa: F401  (registers rlft/Navigation-v0)

    cfg, _spaces, cls = _setup(
        [
            "algo=filtered_bc",
            "env.id=rlft/Navigation-v0",
            "env.kwargs={action_type: continuous}",
            "env.max_episode_steps=10",
            "env.num_envs_per_runner=2",
            "filtered_bc.episodes_per_actor=4",
            "filtered_bc.top_fraction=1.0",
        ]
    )
    collector = cls.sampler(cfg)(**cls.sampler_kwargs(cfg, 0))
    with torch.no_grad():
        collector.policy.log_std.fill_(1.0)  # std e: most Gaussian samples leave [-1, 1]
    batch = collector.sample()
    assert len(batch.actions) and batch.actions.dtype == np.float32
    assert batch.actions.min() >= -1.0 and batch.actions.max() <= 1.0  # the Box bounds
    assert (np.abs(batch.actions) == 1.0).mean() > 0.3  # many samples were clipped


@pytest.mark.parametrize(
    "env",
    [
        ["env.id=CartPole-v1", "env.max_episode_steps=20"],
        [
            "env.id=rlft/Navigation-v0",
            "env.kwargs={action_type: continuous}",
            "env.max_episode_steps=10",
        ],
    ],
    ids=["discrete", "continuous"],
)
def test_filtered_bc_update_imitates_the_kept_episodes(env: list[str]) -> None:
    """One update moves the policy towards the kept (highest-return) episodes' actions:
    their NLL under the policy drops; continuous actions are the executed, clipped ones."""
    import envs  # noqa: F401  (registers rlft/Navigation-v0)

    cfg, spaces, cls = _setup(
        [
            "algo=filtered_bc",
            *env,
            "env.num_envs_per_runner=4",
            "filtered_bc.episodes_per_actor=16",
            "filtered_bc.top_fraction=0.25",
            "filtered_bc.lr=3e-3",
            "seed=0",
        ]
    )
    torch.manual_seed(0)
    learner = cls(cfg, spaces, LearnerContext())
    collector = cls.sampler(cfg)(**cls.sampler_kwargs(cfg, 0))
    collector.set_weights(learner.policy_state(), 0)
    batch = collector.sample()
    accepted = batch.selection.accepted
    assert 0 < accepted.sum() < len(accepted) and len(batch) > 0
    obs = torch.as_tensor(batch.obs, dtype=torch.float32)
    actions = torch.as_tensor(batch.actions)
    if not learner.policy.discrete:  # the executed (clipped) actions are imitated
        assert actions.abs().max() <= 1.0

    def nll() -> float:
        with torch.no_grad():
            params, _ = learner.policy(obs)
            return float(-learner.policy.log_prob_entropy(params, actions)[0].mean())

    before = nll()
    metrics = learner.update(batch, 0.0)
    after = nll()
    assert metrics["rollout/accepted_steps"] == len(batch) and metrics["optim/steps"] == 16
    assert after < before - 0.02, (before, after)
    assert metrics["rollout/return_mean_accepted"] > metrics["rollout/return_mean_all"]
