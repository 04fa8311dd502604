"""Reading the schema: YAML run files, dotted ``key=value`` overrides, typed checks.

:func:`build_config` is the one way into a :class:`~rlft_ray.config.run.RunConfig`:
YAML run files, CLI overrides and Ray Tune search spaces all go through it, and
every key and type is checked (unknown keys get the nearest valid one) before any
Ray work starts. The same typed reader (:func:`from_dict`) parses other frozen
dataclass schemas, such as a tuning spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from rlft_ray.config.errors import ConfigError
from rlft_ray.config.optim import OPTIM_KEYS
from rlft_ray.config.run import RunConfig
from rlft_ray.core.fileio import atomic_write_text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless).
    A mapping for a dataclass field replaces only the keys it names in ``default`` (the
    field's default: a section's own ``optim`` defaults stay where a run file sets ``lr``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key, base=default)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept it as the float it means.
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a float, got {value!r}") from None
        else:
            raise ConfigError(key, f"expected a float, got {value!r}")
        if math.isnan(out):
            raise ConfigError(key, "must not be NaN")
        return out
    if tp is str or tp is Path:
        if isinstance(value, (str, Path)):
            return tp(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(key, f"unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Build the frozen dataclass ``cls`` from a nested mapping, checking every key.

    Args:
        cls: A config dataclass (e.g. :class:`RunConfig`).
        data: Nested mapping of field values; missing fields take defaults.
        prefix: Dotted path of ``cls`` inside the run config, for error messages.
        base: An instance of ``cls`` whose values the missing fields take (default: the
            class's defaults).

    Returns:
        The constructed dataclass instance.

    Raises:
        ConfigError: Unknown key (with the nearest valid one), wrong type or
            out-of-range value; the message names the full dotted key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(dotted, _unknown_key_reason(str(key), list(fields), prefix))
        kwargs[key] = _coerce(value, hints[key], dotted, _field_default(fields[key], base))
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.key.startswith(prefix + "."):
            raise ConfigError(f"{prefix}.{exc.key}", exc.reason) from None
        raise


def _field_default(f: dataclasses.Field, base: Any) -> Any:
    """The value a field holds when a run file does not set it: ``base``'s, else its default."""
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _unknown_key_reason(key: str, names: list[str], prefix: str) -> str:
    """Why ``key`` is refused: it moved into the section's ``optim``, or the nearest name."""
    here = prefix + "." if prefix else ""
    if key in OPTIM_KEYS and "optim" in names:
        return f"moved to {here}optim.{key}"
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"unknown key; did you mean '{here}{near[0]}'?" if near else "unknown key"


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of ``cfg`` (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def flat_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (``{"grpo": {"lr": 1}}`` -> ``{"grpo.optim.lr": 1}``): the
    config as the parameters of an experiment tracker."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_dict(value, dotted))
        else:
            out[dotted] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """Split a ``dotted.key=value`` CLI override; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(item, "override has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key == "a.b.c"``, creating mappings as needed."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, cannot set '{key}' below it")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML run file into a mapping, with a clear error for bad files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"run file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{p} must hold a mapping of config keys at top level")
    return data


#: Short override names for common keys (``rlft-ray train run.yaml model=out/tiny-gpt2``).
OVERRIDE_ALIASES: dict[str, str] = {"model": "lm.model", "prompts": "lm.prompts"}


def build_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML file plus dotted overrides.

    Args:
        path: Optional YAML run file.
        overrides: ``["ppo.lr=3e-4", ...]`` strings or a ``{"ppo.lr": 3e-4}`` mapping
            (the latter is what Tune search spaces produce). Keys in
            :data:`OVERRIDE_ALIASES` (``model`` -> ``lm.model``) are expanded, and
            ``env=CartPole-v1`` (like ``env: CartPole-v1`` in a file) sets ``env.id``.
        base: Optional nested mapping applied before the file (e.g. a saved config).

    Returns:
        The validated, frozen run config.

    Raises:
        ConfigError: Naming the offending key.
    """
    data: dict[str, Any] = {}
    for source in (base or {}, load_yaml(path) if path else {}):
        _deep_merge(data, _env_shorthand(dict(source)))
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        if key == "env" and isinstance(value, str):  # env=CartPole-v1 sets only the id
            key = "env.id"
        set_dotted(data, OVERRIDE_ALIASES.get(key, key), value)
    return from_dict(RunConfig, data)


def _env_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """``env: CartPole-v1`` in a run file means ``env: {id: CartPole-v1}``."""
    if isinstance(data.get("env"), str):
        data["env"] = {"id": data["env"]}
    return data


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = dict(value) if isinstance(value, Mapping) else value


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (what ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(Path(path), config_yaml(cfg))
