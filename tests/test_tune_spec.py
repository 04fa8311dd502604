"""Tuning specs: every key, distribution and combination is checked before Ray starts."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlft_ray.config import ConfigError
from rlft_ray.run.resources import ResourceError
from rlft_ray.tune import (
    SpecError,
    build_scheduler,
    check_concurrency,
    format_table,
    load_spec,
    trial_resources,
)
from rlft_ray.tune.search import _clip_explored

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TUNING = ROOT / "tuning"


def _spec(tmp_path: Path, **changes: Any) -> Path:
    """A valid small spec with ``changes`` applied at top level (None deletes a key)."""
    data: dict[str, Any] = {
        "run_config": str(EXAMPLES / "cartpole_ppo.yaml"),
        "overrides": {"total_env_steps": 4096},
        "resources": {
            "num_rollout_actors": 1,
            "cpus_per_rollout_actor": 0.25,
            "cpus_per_learner": 0.5,
        },
        "search_space": {
            "ppo.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "ppo.num_epochs": {"choice": [2, 4]},
        },
        "scheduler": {"type": "asha", "max_t": 4096, "grace_period": 1024},
        "num_samples": 2,
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


@pytest.mark.parametrize("name", sorted(p.name for p in TUNING.glob("*.yaml")))
def test_repo_specs_validate(name: str) -> None:
    spec = load_spec(TUNING / name)
    assert spec.run_config.is_file() and spec.dimensions
    cfg = spec.trial_config({d.key: d.samples()[0] for d in spec.dimensions})
    assert cfg.resources.num_rollout_actors == 1


def test_valid_spec_resolves_paths_fixed_overrides_and_dimensions(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, run_config="../" * 0 + str(EXAMPLES / "cartpole_ppo.yaml")))
    assert spec.fixed == {
        "total_env_steps": 4096,
        "resources.num_rollout_actors": 1,
        "resources.cpus_per_rollout_actor": 0.25,
        "resources.cpus_per_learner": 0.5,
    }
    assert spec.keys == ["ppo.lr", "ppo.num_epochs"]
    assert spec.keep_checkpoints == 3
    cfg = spec.trial_config({"ppo.lr": 3e-4, "ppo.num_epochs": 4})
    assert (cfg.ppo.lr, cfg.ppo.num_epochs, cfg.total_env_steps) == (3e-4, 4, 4096)
    assert spec.overrides_for({"ppo.lr": 3e-4, "ppo.num_epochs": 4})["ppo.lr"] == 3e-4


def test_run_config_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text((EXAMPLES / "cartpole_ppo.yaml").read_text())
    spec = load_spec(_spec(tmp_path, run_config="sub/run.yaml"))
    assert spec.run_config == (tmp_path / "sub" / "run.yaml").resolve()


@pytest.mark.parametrize(
    ("changes", "key", "text"),
    [
        (
            {"search_space": {"ppo.lrr": {"uniform": [0.1, 0.2]}}},
            "search_space.ppo.lrr",
            "did you mean 'ppo.lr'",
        ),
        (
            {"search_space": {"ppo.lr": {"normal": [0.1, 0.2]}}},
            "search_space.ppo.lr",
            "unknown distribution 'normal'",
        ),
        (
            {"search_space": {"ppo.lr": {"logunifrom": [1e-4, 1e-2]}}},
            "search_space.ppo.lr",
            "did you mean 'loguniform'",
        ),
        (
            {"search_space": {"ppo.lr": {"uniform": [0.2, 0.1]}}},
            "search_space.ppo.lr.uniform",
            "low < high",
        ),
        (
            {"search_space": {"ppo.lr": {"loguniform": [0, 0.1]}}},
            "search_space.ppo.lr.loguniform",
            "low > 0",
        ),
        (
            {"search_space": {"ppo.lr": {"uniform": [0.1]}}},
            "search_space.ppo.lr.uniform",
            "[low, high]",
        ),
        (
            {"search_space": {"ppo.lr": {"choice": []}}},
            "search_space.ppo.lr.choice",
            "at least one",
        ),
        ({"search_space": {"ppo.lr": 0.1}}, "search_space.ppo.lr", "expected one distribution"),
        (
            {"search_space": {"ppo.num_epochs": {"randint": [1.5, 4]}}},
            "search_space.ppo.num_epochs.randint",
            "integers",
        ),
        # uniform over an int field: the midpoint 5.5 is no int
        (
            {"search_space": {"ppo.num_epochs": {"uniform": [1, 10]}}},
            "search_space.ppo.num_epochs",
            "expected an int",
        ),
        # a sampled value out of the field's range
        (
            {"search_space": {"ppo.gamma": {"uniform": [0.9, 1.2]}}},
            "search_space.ppo.gamma",
            "[0, 1]",
        ),
        (
            {"search_space": {"ppo.clip_coef": {"choice": [0.2, "wide"]}}},
            "search_space.ppo.clip_coef",
            "expected a float",
        ),
        (
            {"search_space": {"resources.num_learners": {"choice": [1, 2]}}},
            "search_space.resources.num_learners",
            "resources:",
        ),
        (
            {"search_space": {"total_env_steps": {"choice": [1, 2]}}},
            "search_space.total_env_steps",
            "overrides",
        ),
        ({"search_space": {}}, "search_space", "at least one"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type", "must be one of"),
        ({"scheduler": {"type": "asha"}}, "scheduler.max_t", "max_t > 0"),
        (
            {"scheduler": {"type": "asha", "max_t": 10, "perturbation_interval": 5}},
            "scheduler.perturbation_interval",
            "not a setting",
        ),
        (
            {"scheduler": {"type": "pbt"}},
            "scheduler.perturbation_interval",
            "perturbation_interval > 0",
        ),
        (
            {"scheduler": {"type": "pbt", "perturbation_interval": 5, "mutations": ["ppo.lrr"]}},
            "scheduler.mutations",
            "did you mean 'ppo.lr'",
        ),
        (
            {"scheduler": {"type": "fifo", "time_attr": "loss/policy"}},
            "scheduler.time_attr",
            "counter",
        ),
        ({"scheduler": {"tpye": "fifo"}}, "scheduler.tpye", "did you mean 'scheduler.type'"),
        ({"search": {"algorithm": "bayesopt"}}, "search.algorithm", "must be one of"),
        ({"search": {"algorithm": "grid"}}, "search_space.ppo.lr", "every dimension to be a grid"),
        (
            {"search_space": {"ppo.lr": {"grid": [1e-3, 3e-3]}}, "search": {"algorithm": "optuna"}},
            "search_space.ppo.lr",
            "optuna",
        ),
        (
            {
                "scheduler": {"type": "pbt", "perturbation_interval": 5},
                "search": {"algorithm": "optuna"},
            },
            "search.algorithm",
            "pbt",
        ),
        ({"overrides": {"ppo.lrr": 1e-3}}, "overrides.ppo.lrr", "did you mean 'ppo.lr'"),
        (
            {"resources": {"num_learner": 1}},
            "resources.num_learner",
            "did you mean 'resources.num_learners'",
        ),
        ({"run_config": "missing.yaml"}, "run_config", "not found"),
        ({"run_config": None}, "run_config", "required"),
        ({"num_samples": 0}, "num_samples", ">= 1"),
        ({"mode": "maximize"}, "mode", "must be one of"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials", ">= 1"),
        ({"schedular": {"type": "fifo"}}, "schedular", "did you mean 'scheduler'"),
    ],
)
def test_spec_errors_name_the_key(
    tmp_path: Path, changes: dict[str, Any], key: str, text: str
) -> None:
    err = _error(_spec(tmp_path, **changes))
    assert err.key == key, str(err)
    assert text in str(err)
    assert str(err).startswith(f"{key}: ")


def test_bad_yaml_and_missing_spec(tmp_path: Path) -> None:
    assert "spec file not found" in str(_error(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_space: [unclosed\n")
    assert "not valid YAML" in str(_error(bad))


def test_spec_errors_are_config_errors_and_survive_pickling() -> None:
    # Ray ships exceptions raised in actors and Tune trials by pickling them.
    for cls in (ConfigError, SpecError):
        err = pickle.loads(pickle.dumps(cls("search_space.ppo.lr", "bad")))
        assert (
            isinstance(err, ConfigError)
            and err.key == "search_space.ppo.lr"
            and str(err) == "search_space.ppo.lr: bad"
        )


def test_pbt_mutations_come_from_the_space_and_stay_inside_it(tmp_path: Path) -> None:
    spec = load_spec(
        _spec(
            tmp_path,
            search_space={
                "ppo.lr": {"loguniform": [1e-4, 1e-2]},
                "ppo.num_epochs": {"choice": [2, 4, 8]},
                "ppo.rollout_steps": {"randint": [32, 129]},
            },
            scheduler={
                "type": "pbt",
                "perturbation_interval": 2048,
                "mutations": ["ppo.lr", "ppo.num_epochs", "ppo.rollout_steps"],
            },
        )
    )
    assert spec.keep_checkpoints is None  # PBT keeps every Tune checkpoint by default
    pbt = build_scheduler(spec)
    mutations = pbt._hyperparam_mutations
    assert mutations["ppo.num_epochs"] == [2, 4, 8]
    assert mutations["ppo.lr"].lower == 1e-4 and mutations["ppo.lr"].upper == 1e-2
    dims = spec.dimensions
    clipped = _clip_explored(
        {"ppo.lr": 1.2e-2, "ppo.num_epochs": 8, "ppo.rollout_steps": 160.4}, dims
    )
    assert clipped == {"ppo.lr": 1e-2, "ppo.num_epochs": 8, "ppo.rollout_steps": 128}
    assert _clip_explored({"ppo.lr": 0.8e-4}, dims)["ppo.lr"] == 1e-4


def test_concurrency_is_checked_against_the_cluster(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path))  # 0.25 + 0.5 = 0.75 CPU per trial
    assert check_concurrency(spec, {"CPU": 2.0}) == 2
    assert check_concurrency(load_spec(_spec(tmp_path, max_concurrent_trials=1)), {"CPU": 2.0}) == 1
    with pytest.raises(
        ResourceError,
        match=r"max_concurrent_trials=3 needs 3 x 0.75 CPU per trial .* at most 2 fit",
    ):
        check_concurrency(load_spec(_spec(tmp_path, max_concurrent_trials=3)), {"CPU": 2.0})
    big = _spec(
        tmp_path,
        resources={"num_rollout_actors": 4, "cpus_per_rollout_actor": 1.0, "num_learners": 2},
    )
    with pytest.raises(ResourceError, match="run needs 6 CPUs"):
        check_concurrency(load_spec(big), {"CPU": 2.0})


def test_custom_and_gpu_resources_bound_concurrency_and_trial_bundles(tmp_path: Path) -> None:
    resources = {
        "num_rollout_actors": 2,
        "cpus_per_rollout_actor": 0.25,
        "gpus_per_rollout_actor": 0.5,
        "cpus_per_learner": 0.5,
        "rollout_actor_resources": {"rollout_node": 1},
    }
    spec = load_spec(_spec(tmp_path, resources=resources))
    # 1 CPU, 1 GPU and 2 rollout_node per trial: the custom resource limits first
    assert check_concurrency(spec, {"CPU": 8, "GPU": 4, "rollout_node": 5}) == 2
    assert check_concurrency(spec, {"CPU": 8, "GPU": 1, "rollout_node": 8}) == 1
    pgf = trial_resources(spec)
    assert pgf.head_bundle_is_empty
    assert pgf.bundles == [{"CPU": 0.25, "GPU": 0.5, "rollout_node": 1.0}] * 2


def test_results_table_formats_rows() -> None:
    rows = [
        {
            "trial": "a_00000",
            "status": "TERMINATED",
            "iterations": 40,
            "metric": 123.456,
            "metric_best": 150.0,
            "config": {"ppo.lr": 0.001},
            "error": "",
        },
        {
            "trial": "a_00001",
            "status": "ERROR",
            "iterations": 1,
            "metric": None,
            "metric_best": None,
            "config": {"ppo.lr": 0.1},
            "error": "RunError: boom",
        },
    ]
    table = format_table(rows, "rollout/episode_return_mean").splitlines()
    assert table[0].split() == [
        "trial",
        "status",
        "iterations",
        "rollout/episode_return_mean",
        "best",
        "config",
        "error",
    ]
    assert "123.5" in table[1] and "ppo.lr=0.001" in table[1]
    assert table[2].split()[:4] == ["a_00001", "ERROR", "1", "-"] and table[2].endswith(
        "RunError: boom"
    )
    assert not math.isnan(len(table))
