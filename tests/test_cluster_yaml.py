"""The repo's ``cluster.yaml`` passes Ray's launcher validation and our checks, offline."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlft_ray.apps.cluster_check import validate_cluster_yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails any test that tries to resolve or connect (validation must be offline)."""

    def _blocked(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket.socket, "connect", _blocked)


def _load() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _gpu_type(config: dict[str, Any]) -> str:
    return next(
        name
        for name, node in config["available_node_types"].items()
        if node.get("resources", {}).get("GPU", 0) > 0
    )


def test_repo_cluster_yaml_validates() -> None:
    prepared = validate_cluster_yaml(CLUSTER_YAML)
    assert prepared["cluster_name"] == "rlft-ray"
    gpu = prepared["available_node_types"][_gpu_type(prepared)]
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] > 0
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert "GPU" not in head["resources"]
    # Ray's prepare_config prepended setup_commands to the per-role lists.
    n_common = len(prepared["setup_commands"])
    assert prepared["worker_setup_commands"][:n_common] == prepared["setup_commands"]


@pytest.mark.parametrize(
    "good, bad", [("max_workers", "max_wrokers"), ("head_node_type", "head_node_typ")]
)
def test_misspelled_top_level_key_is_named(tmp_path: Path, good: str, bad: str) -> None:
    config = _load()
    config[bad] = config.pop(good)
    with pytest.raises(ValueError, match=bad):
        validate_cluster_yaml(_write(tmp_path, config))


def test_misspelled_node_type_key_is_named(tmp_path: Path) -> None:
    config = _load()
    node = config["available_node_types"][_gpu_type(config)]
    node["min_worker"] = node.pop("min_workers")
    with pytest.raises(ValueError, match="min_worker") as info:
        validate_cluster_yaml(_write(tmp_path, config))
    assert _gpu_type(config) in str(info.value)


def test_gpu_workers_must_autoscale_from_zero(tmp_path: Path) -> None:
    config = _load()
    config["available_node_types"][_gpu_type(config)]["min_workers"] = 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_cluster_yaml(_write(tmp_path, config))


def test_dashboard_on_all_interfaces_is_rejected(tmp_path: Path) -> None:
    config = _load()
    config["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
        for c in config["head_start_ray_commands"]
    ]
    assert any("0.0.0.0" in c for c in config["head_start_ray_commands"])
    with pytest.raises(ValueError, match=r"dashboard-host=0\.0\.0\.0"):
        validate_cluster_yaml(_write(tmp_path, config))


def test_setup_must_install_project(tmp_path: Path) -> None:
    config = _load()
    config["setup_commands"] = [c for c in config["setup_commands"] if "rlft_ray" not in c]
    with pytest.raises(ValueError, match="setup_commands"):
        validate_cluster_yaml(_write(tmp_path, config))
