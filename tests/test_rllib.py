"""RLlib in the loop: ``algo: rllib`` config checks, RLlib checkpoints in and out of our
gym networks, the multi-agent navigation env. Skipped without RLlib (``rlft-ray[rllib]``)."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("ray.rllib")

from rlft_ray.config import ConfigError, build_config
from rlft_ray.core.errors import CheckpointError
from rlft_ray.learners.nets import ActorCritic, QNetwork
from rlft_ray.learners.rllib_ckpt import (
    dueling_fold,
    export_rllib_module,
    load_rllib_into,
    read_pickle_data,
)

pytestmark = pytest.mark.rllib

OBS = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


def _rllib_module(config_cls, action_space, tmp_path, **model_config):
    """A random RLlib default module saved as an RLModule checkpoint; returns (module, dir)."""
    torch.manual_seed(0)
    spec = config_cls().get_default_rl_module_spec()
    spec.observation_space, spec.action_space = OBS, action_space
    spec.model_config = {**config_cls().model_config, "fcnet_hiddens": [16, 16], **model_config}
    module = spec.build()
    module.save_to_path(str(tmp_path / "module"))
    return module, tmp_path / "module"


def test_unknown_rllib_config_key_fails_naming_it() -> None:
    from rlft_ray.learners.rllib import RLlibLearner

    cfg = build_config(overrides=["algo=rllib", "rllib.config.lrr=0.1"])
    with pytest.raises(ConfigError) as err:
        RLlibLearner.probe(cfg)
    assert err.value.key == "rllib.config.lrr"
    assert "did you mean 'rllib.config.lr'" in str(err.value)
    with pytest.raises(ConfigError, match="rllib.algorithm"):
        build_config(overrides=["algo=rllib", "rllib.algorithm=PPOO"])
    with pytest.raises(ConfigError, match=r"rllib.config.env.*env.id"):
        build_config(overrides=["algo=rllib", "rllib.config.env=CartPole-v1"])


def test_rllib_config_reaches_the_algorithm_config() -> None:
    from rlft_ray.learners.rllib import build_algorithm_config, probe_env

    cfg = build_config(
        overrides={
            "algo": "rllib",
            "seed": 7,
            "rllib.config": {"lr": 1e-3, "model_config": {"fcnet_hiddens": [8]}, "num_epochs": 3},
        }
    )
    algo_config = build_algorithm_config(cfg, probe_env(cfg))
    assert (algo_config.lr, algo_config.num_epochs, algo_config.seed) == (1e-3, 3, 7)
    assert algo_config.model_config["fcnet_hiddens"] == [8]
    assert algo_config.env_config["id"] == "CartPole-v1"


def test_sac_example_config_builds_without_starting_ray() -> None:
    """The shipped SAC example reaches RLlib as its tuned example does (n_step a range: a
    tuple, which RLlib tells from an int by isinstance), and checking it starts no Ray
    instance (Tune's registry lookup used to auto-start one, racing the CLI's early start)."""
    import ray

    from rlft_ray.learners.rllib import build_algorithm_config, probe_env

    cfg = build_config("examples/pendulum_rllib_sac.yaml")
    algo_config = build_algorithm_config(cfg, probe_env(cfg))
    assert algo_config.n_step == (2, 5)
    assert algo_config.get_rollout_fragment_length() == 5
    assert (algo_config.actor_lr, algo_config.critic_lr, algo_config.alpha_lr) == (
        2e-4,
        8e-4,
        9e-4,
    )
    assert algo_config.model_config["fcnet_activation"] == "relu"
    assert not ray.is_initialized()


def test_ppo_module_maps_onto_actor_critic(tmp_path) -> None:
    from ray.rllib.algorithms.ppo import PPOConfig

    module, path = _rllib_module(PPOConfig, gym.spaces.Discrete(2), tmp_path)
    policy = ActorCritic(OBS, gym.spaces.Discrete(2), (16, 16))
    load_rllib_into(policy, path)
    obs = torch.randn(6, 4)
    logits, values = policy(obs)
    with torch.no_grad():
        expected = module.forward_inference({"obs": obs})["action_dist_inputs"]
        expected_values = module.compute_values({"obs": obs})
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(values, expected_values)


def test_dueling_head_folds_into_one_layer() -> None:
    # W_a = [[1, 2], [3, 4]], mean row [2, 3]; w_v = [10, 20]; b_a = [1, 3] (mean 2), b_v = 5
    w_q, b_q = dueling_fold(
        (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, 3.0])),
        (np.array([[10.0, 20.0]]), np.array([5.0])),
    )
    np.testing.assert_allclose(w_q, [[9.0, 19.0], [11.0, 21.0]])
    np.testing.assert_allclose(b_q, [4.0, 6.0])


def test_dueling_dqn_module_maps_onto_q_network(tmp_path) -> None:
    from ray.rllib.algorithms.dqn import DQNConfig

    module, path = _rllib_module(DQNConfig, gym.spaces.Discrete(3), tmp_path, dueling=True)
    q_net = QNetwork(OBS, gym.spaces.Discrete(3), (16, 16))
    load_rllib_into(q_net, path)
    obs = torch.randn(6, 4)
    with torch.no_grad():
        expected = module.compute_q_values({"obs": obs})["qf_preds"]
    torch.testing.assert_close(q_net(obs), expected, rtol=1e-5, atol=1e-5)


def test_what_does_not_map_is_named(tmp_path) -> None:
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.algorithms.sac import SACConfig

    _, relu = _rllib_module(
        PPOConfig, gym.spaces.Discrete(2), tmp_path / "a", fcnet_activation="relu"
    )
    with pytest.raises(CheckpointError, match="fcnet_activation='relu'"):
        load_rllib_into(ActorCritic(OBS, gym.spaces.Discrete(2), (16, 16)), relu)
    _, ok = _rllib_module(PPOConfig, gym.spaces.Discrete(2), tmp_path / "b")
    with pytest.raises(CheckpointError, match="layer shapes"):
        load_rllib_into(ActorCritic(OBS, gym.spaces.Discrete(2), (64, 64)), ok)
    with pytest.raises(CheckpointError, match="not a DQN module"):
        load_rllib_into(QNetwork(OBS, gym.spaces.Discrete(2), (16, 16)), ok)
    box = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    _, sac = _rllib_module(SACConfig, box, tmp_path / "c")
    with pytest.raises(CheckpointError, match="state-dependent std"):
        load_rllib_into(ActorCritic(OBS, box, (16, 16)), sac)


@pytest.mark.parametrize("kind", ["ppo_discrete", "ppo_box", "dqn"])
def test_export_gives_the_same_actions_in_rllib(kind, tmp_path) -> None:
    from ray.rllib.core.rl_module.rl_module import RLModule

    torch.manual_seed(1)
    if kind == "dqn":
        act = gym.spaces.Discrete(3)
        policy = QNetwork(OBS, act, (8, 8))
    else:
        act = gym.spaces.Discrete(2) if kind == "ppo_discrete" else gym.spaces.Box(-1, 1, (2,))
        policy = ActorCritic(OBS, act, (8, 8))
        if kind == "ppo_box":
            policy.log_std.data.fill_(-0.5)
    export_rllib_module(policy, OBS, act, tmp_path / "m")
    module = RLModule.from_checkpoint(str(tmp_path / "m"))
    obs = torch.randn(32, 4)
    ours = policy.act(obs, deterministic=True)[0]
    with torch.no_grad():
        out = module.forward_inference({"obs": obs})
    if kind == "dqn":
        theirs = out["actions"]
    elif kind == "ppo_discrete":
        theirs = out["action_dist_inputs"].argmax(-1)
    else:
        mean, log_std = out["action_dist_inputs"].chunk(2, dim=-1)
        torch.testing.assert_close(log_std, torch.full_like(log_std, -0.5))
        theirs = mean
    torch.testing.assert_close(theirs, ours)
    back = type(policy)(OBS, act, (8, 8))
    load_rllib_into(back, tmp_path / "m")  # and back again, bit for bit
    for key, value in policy.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_export_command_writes_a_module_from_a_run_checkpoint(tmp_path) -> None:
    from ray.rllib.core.rl_module.rl_module import RLModule

    from rlft_ray.apps.export import export_rllib
    from rlft_ray.learners.checkpoint import Counters, save_checkpoint

    cfg = build_config(overrides=["algo=ppo", "ppo.hidden_sizes=[8, 8]"])
    policy = ActorCritic(OBS, gym.spaces.Discrete(2), (8, 8))
    sig = {"observation": "Box(4,)", "action": "Discrete(2)"}
    opt = torch.optim.Adam(policy.parameters())
    save_checkpoint(tmp_path / "ck", {"policy": policy}, opt, Counters(), cfg, sig)
    info = export_rllib(tmp_path / "ck", tmp_path / "out")
    assert info["module"] == "DefaultPPOTorchRLModule"
    module = RLModule.from_checkpoint(str(tmp_path / "out"))
    obs = torch.randn(5, 4)
    with torch.no_grad():
        logits = module.forward_inference({"obs": obs})["action_dist_inputs"]
    torch.testing.assert_close(logits, policy(obs)[0].detach())
    with pytest.raises(ConfigError, match="not empty"):
        export_rllib(tmp_path / "ck", tmp_path / "out")


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['RLFT_EVIL'], 'w').write('ran')",))


def test_pickle_reader_runs_no_code(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("RLFT_EVIL", str(marker))
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps({"w": np.arange(3.0), "evil": _Evil()}))
    data = read_pickle_data(path)
    np.testing.assert_array_equal(data["w"], [0.0, 1.0, 2.0])
    assert type(data["evil"]).qualname == "builtins.exec"
    assert not marker.exists()


def test_multi_navigation_passes_rllib_checks_and_collides() -> None:
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    from envs.multi_navigation import MultiNavigationEnv

    env = MultiNavigationEnv()
    check_multiagent_environments(env)
    env.reset(seed=0, options={"starts": [[-0.5, -0.5], [0.5, 0.5]]})
    # head-on along the diagonal (action 1 = north-east, 5 = south-west), 0.1 per step:
    # after one step each is sqrt(2) - 0.1 from its goal; after 7 they are 0.014 apart
    _, rewards, term, _, _ = env.step({"agent_0": 1, "agent_1": 5})
    assert rewards["agent_0"] == pytest.approx(-(np.sqrt(2) - 0.1))
    for _ in range(6):
        _, rewards, term, _, infos = env.step({"agent_0": 1, "agent_1": 5})
    assert term["__all__"] and infos["agent_0"]["collided"]
    assert rewards == {"agent_0": -10.0, "agent_1": -10.0}
    assert not infos["agent_0"]["is_success"]


def test_multi_navigation_success_needs_both_agents() -> None:
    from envs.multi_navigation import MultiNavigationEnv

    env = MultiNavigationEnv(goals=((0.5, 0.0), (-0.5, 0.0)))
    env.reset(options={"starts": [[0.25, 0.0], [-0.15, 0.0]]})
    _, _, term, _, infos = env.step({"agent_0": 0, "agent_1": 4})  # 0.35 / -0.25: both on
    assert term == {"agent_0": False, "agent_1": False, "__all__": False}
    _, _, term, _, infos = env.step({"agent_0": 0, "agent_1": 4})  # agent_0 at 0.45: done
    assert term["agent_0"] and not term["__all__"] and infos["agent_0"]["is_success"]
    assert env.agents == ["agent_1"]
    _, _, term, _, infos = env.step({"agent_1": 4})  # agent_1 at -0.45: done, both
    assert term["__all__"] and infos["agent_1"]["is_success"]


def test_pettingzoo_parallel_env_becomes_a_multi_agent_env() -> None:
    pytest.importorskip("pettingzoo")
    from pettingzoo.test import parallel_api_test
    from ray.rllib.utils.pre_checks.env import check_multiagent_environments

    from envs.multi_navigation_pz import MultiNavigationParallelEnv
    from rlft_ray.learners.rllib import probe_env

    parallel_api_test(MultiNavigationParallelEnv(), num_cycles=100)
    cfg = build_config(
        overrides=["algo=rllib", "env.id=envs.multi_navigation_pz:MultiNavigationParallelEnv"]
    )
    info = probe_env(cfg)
    assert info.agents == ("agent_0", "agent_1")
    from rlft_ray.rollout.rllib_env import make_env

    check_multiagent_environments(make_env({"id": cfg.env.id, "kwargs": {}}))


def test_the_core_path_does_not_import_rllib() -> None:
    """Installed or not, RLlib is imported only when algo: rllib or an RLlib checkpoint is used."""
    import subprocess
    import sys

    code = (
        "import sys, rlft_ray.cli, rlft_ray.run.driver, rlft_ray.run.loop\n"
        "from rlft_ray.learners.registry import get_learner_cls\n"
        "[get_learner_cls(a) for a in ('ppo', 'dqn', 'rllib')]\n"
        "print(','.join(m for m in sys.modules if m.startswith(('ray.rllib', 'pettingzoo'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_early_stops_use_the_last_20_episodes_across_iterations() -> None:
    """RLlib's own episode_return_mean averages one iteration's episodes; stop_return
    waits for 20 episodes, as the Ray Train loop does."""
    from rlft_ray.learners.checkpoint import Counters
    from rlft_ray.rollout.rllib_env import RETURNS_KEY, SUCCESSES_KEY
    from rlft_ray.run.rllib_metrics import episode_lists
    from rlft_ray.run.rllib_run import _finished

    cfg = build_config(overrides=["algo=rllib", "stop_return=450", "stop_success_rate=0.9"])
    counters = Counters()
    counters.record_episodes(*episode_lists({RETURNS_KEY: [100.0] * 18}))
    counters.record_episodes(*episode_lists({RETURNS_KEY: [500.0, 500.0]}))  # a lucky iteration
    assert counters.episodes == 20 and counters.return_mean() == 140.0
    assert not _finished(cfg, counters)
    counters.record_episodes(*episode_lists({RETURNS_KEY: [500.0] * 18}))  # (2*500+18*500)/20
    assert counters.return_mean() == 500.0 and _finished(cfg, counters)
    counters = Counters()
    counters.record_episodes(*episode_lists({RETURNS_KEY: [0.0] * 19, SUCCESSES_KEY: [1.0] * 19}))
    assert not _finished(cfg, counters)  # 19 successes: no full window yet
    counters.record_episodes(*episode_lists({RETURNS_KEY: [0.0], SUCCESSES_KEY: [1.0]}))
    assert _finished(cfg, counters)
    # an iteration in which one episode ended: RLlib reports the one-item series as the item
    assert episode_lists({RETURNS_KEY: -150.0, SUCCESSES_KEY: 1.0}) == ([-150.0], [True])
    assert episode_lists({}) == ([], [])


def test_episode_returns_span_the_chunks_an_env_runner_cuts() -> None:
    """SAC samples 5-step fragments: Pendulum's 200-step episode ends in a chunk of at most
    5 steps. The logged return is the whole episode's (RLlib's own episode_return_mean), not
    the last chunk's (about -7 instead of about -1200, as it was)."""
    import numpy as np
    from ray.rllib.algorithms.sac import SACConfig
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
    from ray.rllib.utils.metrics.metrics_logger import MetricsLogger

    from rlft_ray.rollout.rllib_env import RETURNS_KEY, EpisodeRecorder
    from rlft_ray.run.rllib_metrics import episode_lists

    config = (
        SACConfig()
        .environment("Pendulum-v1")
        .env_runners(rollout_fragment_length=5, num_envs_per_env_runner=1)
        .callbacks(EpisodeRecorder)
        .debugging(seed=0)
    )
    runner = SingleAgentEnvRunner(config=config)
    try:
        for _ in range(41):  # 205 steps: one 200-step episode ends
            runner.sample(num_timesteps=5, random_actions=True)
        logger = MetricsLogger()  # what the algorithm does with its runners' metrics
        logger.aggregate([runner.get_metrics()])
    finally:
        runner.stop()
    returns, _ = episode_lists({RETURNS_KEY: logger.peek(RETURNS_KEY)})
    assert len(returns) == 1
    assert returns[0] == pytest.approx(float(np.mean(logger.peek("episode_return_mean"))))
    assert returns[0] < -100.0  # a random 200-step episode; a 5-step chunk is > -5 * 16.3
