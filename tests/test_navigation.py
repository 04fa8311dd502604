"""Tests for the ``rlft/Navigation-v0`` environment (``envs.navigation.NavigationEnv``)."""

from __future__ import annotations

import importlib
import itertools
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.navigation import NavigationEnv

ENV_ID = "rlft/Navigation-v0"
ACTION_TYPES = ["continuous", "discrete"]


def _make(**kwargs) -> gym.Env:
    return gym.make(ENV_ID, **kwargs)


def _rollout(env: gym.Env, seed: int, n_steps: int) -> tuple[list[np.ndarray], list[float]]:
    """Reset with ``seed`` and take ``n_steps`` actions sampled from a seeded action space."""
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    observations, rewards = [obs], []
    for _ in range(n_steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return observations, rewards


# ----------------------------------------------------------------------------- registration


def test_registered_with_time_limit_of_50() -> None:
    spec = gym.spec(ENV_ID)
    assert spec.entry_point == "envs.navigation:NavigationEnv"
    assert spec.max_episode_steps == 50
    env = _make()
    assert isinstance(env.unwrapped, NavigationEnv)
    assert env.spec is not None and env.spec.max_episode_steps == 50


def test_reimport_does_not_reregister() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when an id is overridden
        importlib.reload(envs)
    assert ENV_ID in gym.registry
    assert gym.spec(ENV_ID).max_episode_steps == 50


# ----------------------------------------------------------------------------- env checker


@pytest.mark.parametrize("action_type", ACTION_TYPES)
@pytest.mark.parametrize("render_mode", [None, "rgb_array"])
def test_check_env_on_made_env(action_type: str, render_mode: str | None) -> None:
    env = _make(action_type=action_type, render_mode=render_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        check_env(env.unwrapped)


@pytest.mark.parametrize("action_type", ACTION_TYPES)
def test_check_env_on_direct_instance(action_type: str) -> None:
    env = NavigationEnv(goal=(-0.3, 0.8), action_type=action_type, render_mode="rgb_array")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    # Without a spec the checker can only say it cannot re-make the env; nothing else.
    messages = [str(w.message) for w in caught]
    assert all("not having a spec" in m for m in messages), messages


# ----------------------------------------------------------------------------- seeding


@pytest.mark.parametrize("action_type", ACTION_TYPES)
def test_same_seed_same_trajectory(action_type: str) -> None:
    obs_a, rew_a = _rollout(_make(action_type=action_type), seed=7, n_steps=30)
    obs_b, rew_b = _rollout(_make(action_type=action_type), seed=7, n_steps=30)
    assert len(obs_a) == len(obs_b) > 1
    for a, b in zip(obs_a, obs_b):
        np.testing.assert_array_equal(a, b)
    assert rew_a == rew_b


def test_different_seeds_differ() -> None:
    env = _make()
    starts = {tuple(env.reset(seed=s)[0][:2].tolist()) for s in range(5)}
    assert len(starts) == 5
    obs_a, rew_a = _rollout(_make(), seed=1, n_steps=10)
    obs_b, rew_b = _rollout(_make(), seed=2, n_steps=10)
    assert not np.array_equal(obs_a[-1], obs_b[-1])
    assert rew_a != rew_b


def test_reset_start_is_uniform_in_box_and_outside_goal_radius() -> None:
    env = NavigationEnv(goal=(0.0, 0.0), goal_radius=0.9)
    starts = np.array([env.reset(seed=s)[0][:2] for s in range(200)], dtype=np.float64)
    assert np.all(np.abs(starts) <= 1.0)
    assert np.all(np.linalg.norm(starts, axis=1) >= 0.9 - 1e-6)
    # All four quadrants get visited.
    quadrants = {(bool(x > 0), bool(y > 0)) for x, y in starts}
    assert len(quadrants) == 4


# ----------------------------------------------------------------------------- dynamics


def test_observation_layout() -> None:
    env = NavigationEnv(goal=(-0.5, 0.25))
    obs, info = env.reset(options={"start": (0.3, -0.7)})
    assert obs.dtype == np.float32 and obs.shape == (4,)
    np.testing.assert_array_equal(obs, np.array([0.3, -0.7, -0.5, 0.25], dtype=np.float32))
    assert info["is_success"] is False
    assert info["distance"] == pytest.approx(math.hypot(0.8, -0.95))


def test_reward_is_minus_distance_discrete_step() -> None:
    env = NavigationEnv(goal=(0.5, 0.5), action_type="discrete", max_step=0.1)
    env.reset(options={"start": (0.2, -0.4)})
    # Action 3 = 135° (north-west): move 0.1 * (-1/sqrt(2), 1/sqrt(2)).
    obs, reward, terminated, truncated, info = env.step(3)
    x = 0.2 - 0.1 / math.sqrt(2)
    y = -0.4 + 0.1 / math.sqrt(2)
    expected_distance = math.hypot(x - 0.5, y - 0.5)
    assert isinstance(reward, float)
    assert reward == pytest.approx(-expected_distance, abs=1e-12)
    assert info["distance"] == pytest.approx(expected_distance, abs=1e-12)
    np.testing.assert_allclose(obs[:2], [x, y], atol=1e-7)
    assert terminated is False and truncated is False and info["is_success"] is False


def test_reward_is_minus_distance_from_seeded_start() -> None:
    env = NavigationEnv(goal=(-0.2, 0.6), action_type="discrete", max_step=0.05)
    env.reset(seed=123)
    start = env.position
    _, reward, _, _, _ = env.step(6)  # 270°: straight south
    expected = start + np.array([0.0, -0.05])
    expected = np.clip(expected, -1.0, 1.0)
    assert reward == pytest.approx(-math.hypot(*(expected - (-0.2, 0.6))), abs=1e-12)
    np.testing.assert_allclose(env.position, expected, atol=1e-12)


def test_continuous_action_is_clipped_then_scaled() -> None:
    env = NavigationEnv(goal=(0.5, 0.5), action_type="continuous", max_step=0.2)
    env.reset(options={"start": (0.0, 0.0)})
    _, reward, *_ = env.step(np.array([0.5, -3.0], dtype=np.float32))
    np.testing.assert_allclose(env.position, [0.1, -0.2], atol=1e-12)
    assert reward == pytest.approx(-math.hypot(0.4, 0.7), abs=1e-12)


def test_position_is_clipped_to_the_box() -> None:
    env = NavigationEnv(goal=(0.0, 0.0), action_type="continuous", max_step=0.1)
    obs, _ = env.reset(options={"start": (0.95, -0.98)})
    obs, reward, *_ = env.step([1.0, -1.0])
    np.testing.assert_array_equal(obs[:2], [1.0, -1.0])
    assert reward == pytest.approx(-math.sqrt(2.0))
    assert env.observation_space.contains(obs)


@pytest.mark.parametrize("k", range(8))
def test_discrete_action_k_moves_at_k_times_45_degrees(k: int) -> None:
    max_step = 0.1
    env = NavigationEnv(goal=(0.9, 0.9), action_type="discrete", max_step=max_step)
    env.reset(options={"start": (0.0, 0.0)})
    env.step(k)
    delta = env.position
    assert np.linalg.norm(delta) == pytest.approx(max_step, abs=1e-12)
    angle = math.degrees(math.atan2(delta[1], delta[0])) % 360.0
    assert angle == pytest.approx(45.0 * k, abs=1e-9)


def test_discrete_compass_points() -> None:
    env = NavigationEnv(goal=(0.9, 0.9), action_type="discrete", max_step=0.1)
    expected = {0: (0.1, 0.0), 2: (0.0, 0.1), 4: (-0.1, 0.0), 6: (0.0, -0.1)}
    for k, move in expected.items():
        env.reset(options={"start": (0.0, 0.0)})
        env.step(np.int64(k))
        np.testing.assert_allclose(env.position, move, atol=1e-12)


# ----------------------------------------------------------------------------- episodes


@pytest.mark.parametrize("seed", range(5))
def test_straight_policy_reaches_goal(seed: int) -> None:
    goal = np.array([0.5, -0.3])
    env = _make(goal=tuple(goal), action_type="continuous")
    obs, _ = env.reset(seed=seed)
    rewards = []
    for _ in range(50):
        direction = goal - obs[:2]
        action = direction / np.max(np.abs(direction))  # largest axis = full step
        obs, reward, terminated, truncated, info = env.step(action.astype(np.float32))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated is True and truncated is False
    assert info["is_success"] is True
    assert info["distance"] < 0.1
    assert reward == pytest.approx(-info["distance"])
    assert all(b > a for a, b in itertools.pairwise(rewards))  # strictly closer every step


@pytest.mark.parametrize("seed", range(5))
def test_greedy_discrete_policy_reaches_goal(seed: int) -> None:
    goal = (-0.5, 0.2)
    env = _make(goal=goal, action_type="discrete")
    obs, _ = env.reset(seed=seed)
    for _ in range(50):
        angle = math.atan2(goal[1] - obs[1], goal[0] - obs[0])
        action = round(angle / (math.pi / 4)) % 8
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    assert terminated is True and truncated is False
    assert info["is_success"] is True


@pytest.mark.parametrize(
    ("action_type", "action"),
    [("continuous", np.zeros(2, dtype=np.float32)), ("discrete", 5)],  # 5 = 225°, away
)
def test_non_reaching_policy_truncates_at_exactly_50_steps(action_type: str, action) -> None:
    env = _make(goal=(0.5, 0.5), action_type=action_type)
    env.reset(seed=3)
    for t in range(1, 51):
        _, reward, terminated, truncated, info = env.step(action)
        assert terminated is False
        assert info["is_success"] is False
        assert reward < -0.1
        assert truncated is (t == 50)
    assert truncated is True


def test_unwrapped_env_never_truncates() -> None:
    env = NavigationEnv(action_type="discrete")
    env.reset(seed=0)
    for _ in range(120):
        *_, terminated, truncated, _ = env.step(5)
        assert truncated is False and terminated is False


# ----------------------------------------------------------------------------- kwargs


def test_kwargs_pass_through_make() -> None:
    env = _make(goal=(-0.5, 0.2), action_type="discrete")
    assert env.action_space == gym.spaces.Discrete(8)
    assert env.observation_space == gym.spaces.Box(-1, 1, shape=(4,), dtype=np.float32)
    np.testing.assert_array_equal(env.unwrapped.goal, [-0.5, 0.2])
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[2:], np.array([-0.5, 0.2], dtype=np.float32))

    env = _make(goal=[0.1, 0.0], max_step=0.25, goal_radius=0.3)
    assert env.action_space == gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
    assert env.unwrapped.max_step == 0.25 and env.unwrapped.goal_radius == 0.3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"goal": (1.5, 0.0)}, "goal"),
        ({"goal": (0.0, -1.01)}, "goal"),
        ({"goal": (0.1, 0.2, 0.3)}, "goal"),
        ({"goal": "ab"}, "goal"),
        ({"goal": (0.0, float("nan"))}, "goal"),
        ({"action_type": "box"}, "action_type"),
        ({"max_step": 0.0}, "max_step"),
        ({"max_step": -0.1}, "max_step"),
        ({"goal_radius": 0.0}, "goal_radius"),
        ({"goal_radius": 1.5}, "goal_radius"),
    ],
)
def test_bad_kwargs_raise_value_error_naming_the_kwarg(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} "):
        NavigationEnv(**kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        _make(**kwargs)


def test_bad_render_mode_raises() -> None:
    with pytest.raises(ValueError, match=r"^render_mode "):
        NavigationEnv(render_mode="ansi")


def test_bad_actions_and_step_before_reset() -> None:
    env = NavigationEnv(action_type="discrete")
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    for bad in (8, -1, 1.5):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)
    env = NavigationEnv(action_type="continuous")
    env.reset(seed=0)
    for bad in ([1.0], [0.0, np.nan], "xy"):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"goal": (0, 0)})


# ----------------------------------------------------------------------------- render


def test_render_rgb_array_draws_agent_and_goal() -> None:
    env = NavigationEnv(goal=(0.5, 0.5), render_mode="rgb_array")
    env.reset(options={"start": (-0.5, -0.5)})
    frame = env.render()
    assert frame is not None
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    scale = 63 / 2
    goal_px = frame[round((1 - 0.5) * scale), round((1 + 0.5) * scale)]
    agent_px = frame[round((1 + 0.5) * scale), round((1 - 0.5) * scale)]
    corner_px = frame[0, 0]
    assert goal_px[1] > goal_px[0]  # green
    assert agent_px[0] > agent_px[1]  # red
    assert len({tuple(goal_px), tuple(agent_px), tuple(corner_px)}) == 3
    # The agent dot moves with the agent.
    env.step([1.0, 1.0])
    assert not np.array_equal(env.render(), frame)


def test_render_without_mode_returns_none() -> None:
    env = NavigationEnv()
    env.reset(seed=0)
    assert env.render() is None
