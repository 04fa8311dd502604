"""The run schema: YAML + dotted overrides, errors that name the key (no Ray involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlft_ray.config import (
    ConfigError,
    PPOConfig,
    RunConfig,
    build_config,
    load_yaml,
    save_config,
    to_dict,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_examples_load_and_overrides_apply() -> None:
    cfg = build_config(
        EXAMPLES / "cartpole_ppo.yaml", ["ppo.lr=3e-4", "resources.num_rollout_actors=2"]
    )
    assert cfg.algo == "ppo"
    assert cfg.ppo.lr == pytest.approx(
        3e-4
    )  # YAML 1.1 reads "3e-4" as a string; the schema makes it a float
    assert cfg.resources.num_rollout_actors == 2
    assert cfg.env.id == "CartPole-v1"
    assert isinstance(cfg.ppo.hidden_sizes, tuple)
    for name in ("cartpole_dqn.yaml", "navigation_ppo.yaml"):
        build_config(EXAMPLES / name)


def test_override_of_nested_kwargs_and_lists() -> None:
    cfg = build_config(
        EXAMPLES / "navigation_ppo.yaml",
        ["env.kwargs.goal=[-0.5,-0.5]", "ppo.hidden_sizes=[32,32]"],
    )
    assert cfg.env.kwargs == {"goal": [-0.5, -0.5], "action_type": "discrete"}
    assert cfg.ppo.hidden_sizes == (32, 32)


def test_env_shorthand_sets_only_the_id(tmp_path: Path) -> None:
    # on the command line: the file's other env keys (kwargs) stay
    cfg = build_config(EXAMPLES / "navigation_ppo.yaml", ["env=rlft/Navigation-v0"])
    assert cfg.env.id == "rlft/Navigation-v0" and cfg.env.kwargs["action_type"] == "discrete"
    assert build_config(EXAMPLES / "cartpole_ppo.yaml", ["env=Acrobot-v1"]).env.id == "Acrobot-v1"
    # in a run file
    (tmp_path / "run.yaml").write_text("algo: ppo\nenv: Acrobot-v1\n")
    assert build_config(tmp_path / "run.yaml").env.id == "Acrobot-v1"
    with pytest.raises(ConfigError, match="env.nope"):
        build_config(tmp_path / "run.yaml", ["env.nope=1"])


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("ppo.lrr=1e-3", "ppo.lrr", "did you mean 'ppo.lr'"),
        (
            "resources.num_rollout_actor=2",
            "resources.num_rollout_actor",
            "did you mean 'resources.num_rollout_actors'",
        ),
        ("ppo.lr=-0.1", "ppo.lr", "must be > 0"),
        ("ppo.clip_coef=0", "ppo.clip_coef", "must be > 0"),
        ("ppo.num_epochs=two", "ppo.num_epochs", "expected an int"),
        ("ppo.lr=abc", "ppo.lr", "expected a float"),
        ("ppo.norm_adv=3", "ppo.norm_adv", "expected a bool"),
        ("dqn.tau=1.5", "dqn.tau", "must be in (0, 1]"),
        ("algo=ppp", "algo", "did you mean 'ppo'"),
        ("resources.num_learners=0", "resources.num_learners", "must be >= 1"),
        ("env.num_envs_per_runner=0", "env.num_envs_per_runner", "must be >= 1"),
        ("ppo=3", "ppo", "expected a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(EXAMPLES / "cartpole_ppo.yaml", [override])
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(key)


def test_unknown_top_level_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: ppo\ntotal_env_step: 100\n")
    with pytest.raises(
        ConfigError, match=r"total_env_step: unknown key; did you mean 'total_env_steps'"
    ):
        build_config(bad)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run file not found"):
        build_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        build_config(None, ["ppo.lr"])


def test_learners_must_divide_actors() -> None:
    with pytest.raises(ConfigError, match="resources.num_rollout_actors: must be a multiple"):
        build_config(None, ["resources.num_rollout_actors=3", "resources.num_learners=2"])


def test_config_is_frozen_and_round_trips(tmp_path: Path) -> None:
    cfg = build_config(EXAMPLES / "cartpole_dqn.yaml", ["dqn.batch_size=64", "seed=7"])
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(base=load_yaml(tmp_path / "config.yaml"))
    assert again == cfg
    assert to_dict(again)["dqn"]["batch_size"] == 64


def test_defaults_are_the_papers() -> None:
    ppo = PPOConfig()
    assert (ppo.clip_coef, ppo.gamma, ppo.gae_lambda, ppo.vf_coef, ppo.max_grad_norm) == (
        0.2,
        0.99,
        0.95,
        0.5,
        0.5,
    )
    assert RunConfig().algo == "ppo"


def test_cli_rejects_bad_input_before_any_ray_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from rlft_ray.cli import main

    example = str(EXAMPLES / "cartpole_ppo.yaml")
    assert main(["train", example, "ppo.lrr=1", "--output-dir", str(tmp_path / "a")]) == 2
    assert "ppo.lrr: unknown key; did you mean 'ppo.lr'?" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                example,
                f"init_from={tmp_path / 'nope'}",
                "--output-dir",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert f"checkpoint not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["train", example, "--resume", "--output-dir", str(tmp_path / "c")]) == 1
    assert "holds no run to resume" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.yaml").write_text("algo: ppo\n")
    assert main(["train", example, "--output-dir", str(tmp_path / "d")]) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                example,
                "algo=dqn",
                "env.id=rlft/Navigation-v0",
                "--output-dir",
                str(tmp_path / "e"),
            ]
        )
        == 1
    )
    assert "DQN needs a Discrete action space" in capsys.readouterr().err
    assert not ray.is_initialized()
