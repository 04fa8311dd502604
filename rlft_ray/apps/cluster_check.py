"""Offline validation of a Ray cluster-launcher YAML (``cluster.yaml``).

``ray up`` prepares a launcher config in ``ray.autoscaler._private.commands._bootstrap_config``:

1. ``prepare_config``: merge with the provider's ``defaults.yaml`` (``fillout_defaults``),
   prepend ``setup_commands`` to the head/worker setup lists, check the Docker block and
   fill per-node-type ``min_workers``/``max_workers``. Pure: it only reads files that
   ship with Ray.
2. ``provider_cls.fillout_available_node_types_resources``: on AWS this calls EC2
   ``DescribeInstanceTypes`` to fill missing ``resources``. Needs credentials and network.
3. ``validate_config``: JSON-schema check against ``ray/autoscaler/ray-schema.json`` plus
   head-node-type and ``max_workers`` consistency checks. Pure.
4. ``provider_cls.bootstrap_config``: creates IAM roles, key pairs, security groups. Cloud.

:func:`validate_cluster_yaml` runs steps 1 and 3 only, so it needs no credentials and
makes no network call. Because step 2 is skipped, every node type must state its
``resources`` explicitly (the schema requires the key), which is also what lets the
autoscaler scale a GPU type up from zero. On top of Ray's checks it enforces this
project's conventions: GPU workers autoscale from zero, the dashboard binds to
localhost only, and the setup commands install Ray and this project.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["validate_cluster_yaml"]

_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
_DASHBOARD_HOST_RE = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\";]+)")
_RAY_INSTALL_RE = re.compile(r"pip3?\s+install\b.*\bray\[[^\]]*\]")
_PIP_INSTALL_RE = re.compile(r"pip3?\s+install\b")


def _schema_error_message(exc: Exception) -> str:
    """Formats a ``jsonschema.ValidationError`` as ``"<where>: <Ray's message>"``.

    Args:
        exc: The validation error raised by Ray's ``validate_config``.

    Returns:
        The error message prefixed with the dotted path of the offending object.
    """
    path = ".".join(str(p) for p in getattr(exc, "absolute_path", ())) or "<top level>"
    message = getattr(exc, "message", None) or str(exc)
    return f"{path}: {message}"


def _ray_prepare_and_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Runs Ray's offline config preparation and schema validation.

    Args:
        raw: The config as loaded from YAML.

    Returns:
        The prepared config (merged with Ray's provider defaults).

    Raises:
        ValueError: Ray rejected the config; the message is Ray's and names the key.
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = raw.get("provider")
    if not isinstance(provider, Mapping) or "type" not in provider:
        raise ValueError("provider: a mapping with a `type` (e.g. `type: aws`) is required")
    try:
        # Step 1 of `ray up`: defaults merge, setup-command merge, docker check,
        # per-type worker bounds. Reads only files shipped with Ray.
        prepared = prepare_config(copy.deepcopy(raw))
        # Step 3 of `ray up`: schema + head type + max_workers checks.
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        raise ValueError(f"Ray rejected the cluster config: {_schema_error_message(exc)}") from exc
    except NotImplementedError as exc:  # unknown provider type (a RuntimeError subclass)
        raise ValueError(f"provider.type: {exc}") from exc
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(f"Ray rejected the cluster config: {exc}") from exc
    return prepared


def _check_gpu_workers(config: Mapping[str, Any]) -> list[str]:
    """Checks that GPU worker types exist and autoscale from zero.

    Args:
        config: A prepared launcher config.

    Returns:
        The names of the GPU worker node types.

    Raises:
        ValueError: No worker type declares a GPU, one has ``min_workers`` above 0, or
            none can be scaled above 0 workers.
    """
    head = config["head_node_type"]
    global_max = int(config.get("max_workers", 0))
    gpu_types = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and float((node.get("resources") or {}).get("GPU", 0)) > 0
    }
    if not gpu_types:
        raise ValueError(
            "available_node_types: no worker node type declares a GPU in `resources` "
            '(e.g. `resources: {"CPU": 4, "GPU": 1}`)'
        )
    for name, node in gpu_types.items():
        if node.get("min_workers", 0) != 0:
            raise ValueError(
                f"available_node_types.{name}.min_workers: GPU workers must autoscale from "
                f"zero (min_workers: 0), got {node['min_workers']}"
            )
    if not any(min(int(n.get("max_workers", 0)), global_max) > 0 for n in gpu_types.values()):
        raise ValueError(
            "max_workers: no GPU worker type can be scaled up "
            f"(max_workers of {sorted(gpu_types)} and the global max_workers must be > 0)"
        )
    return sorted(gpu_types)


def _check_dashboard_localhost(commands: Iterable[str]) -> None:
    """Checks that ``ray start --head`` binds the dashboard to localhost.

    Args:
        commands: The prepared ``head_start_ray_commands``.

    Raises:
        ValueError: No ``ray start --head`` command, or its ``--dashboard-host`` is missing
            or not 127.0.0.1/localhost.
    """
    head_starts = [c for c in commands if "ray start" in c and "--head" in c]
    if not head_starts:
        raise ValueError("head_start_ray_commands: no `ray start --head ...` command")
    for cmd in head_starts:
        hosts = _DASHBOARD_HOST_RE.findall(cmd)
        if not hosts:
            raise ValueError(
                "head_start_ray_commands: `ray start --head` must pass "
                "--dashboard-host=127.0.0.1 (reach the dashboard via `ray dashboard`)"
            )
        for host in hosts:
            if host not in _LOCAL_HOSTS:
                raise ValueError(
                    f"head_start_ray_commands: --dashboard-host={host} exposes the dashboard "
                    "and job API; use --dashboard-host=127.0.0.1 and `ray dashboard cluster.yaml`"
                )


def _check_setup_installs_project(config: Mapping[str, Any]) -> None:
    """Checks that ``setup_commands`` install Ray and the synced project.

    Args:
        config: A prepared launcher config.

    Raises:
        ValueError: No command pip-installs ``ray[...]``, or none pip-installs a
            directory that ``file_mounts`` syncs to the nodes.
    """
    commands = [str(c) for c in config.get("setup_commands") or []]
    if not any(_RAY_INSTALL_RE.search(c) for c in commands):
        raise ValueError(
            'setup_commands: no command installs Ray (e.g. pip install -U "ray[default,train,tune]==X")'
        )
    targets = [str(t).rstrip("/") for t in (config.get("file_mounts") or {})]
    if not targets:
        raise ValueError(
            'file_mounts: the project is not synced to the nodes (e.g. "~/rlft_ray": ".")'
        )
    if not any(_PIP_INSTALL_RE.search(c) and any(t in c for t in targets) for c in commands):
        raise ValueError(
            f"setup_commands: no command pip-installs the synced project from {targets} "
            "(e.g. cd ~/rlft_ray && pip install -e .)"
        )


def validate_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """Validates a Ray cluster-launcher YAML offline, the way ``ray up`` would.

    Runs Ray's own ``prepare_config`` (merge with the provider's defaults) and
    ``validate_config`` (``ray-schema.json`` plus consistency checks), skipping the
    provider steps that call the cloud, then this project's checks: a GPU worker type
    exists and every GPU worker type has ``min_workers: 0``; the head's ``ray start``
    binds the dashboard to 127.0.0.1; ``setup_commands`` install Ray and the project
    synced by ``file_mounts``.

    Args:
        path: Path to the cluster YAML.

    Returns:
        The prepared config, as Ray's launcher would use it before the cloud steps.

    Raises:
        ValueError: The file is not a YAML mapping, Ray rejects it (the message is Ray's
            and names the offending key), or one of this project's checks fails.
        FileNotFoundError: ``path`` does not exist.
    """
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping")

    prepared = _ray_prepare_and_validate(raw)
    _check_gpu_workers(prepared)
    _check_dashboard_localhost(str(c) for c in prepared.get("head_start_ray_commands") or [])
    _check_setup_installs_project(prepared)
    return prepared
