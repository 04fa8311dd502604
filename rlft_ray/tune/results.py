"""Results of a search: the per-trial table, ``results.csv``, ``best.json`` and the curves plot."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rlft_ray.core.fileio import atomic_write_json, atomic_write_text
from rlft_ray.run.plots import plot_curves
from rlft_ray.tune.spec import TuneSpec
from rlft_ray.tune.trial import COMPLETED_KEY


def _short_error(error: BaseException | None) -> str:
    """The innermost cause of a trial's error as ``Type: last line``."""
    if error is None:
        return ""
    exc: BaseException = error
    for _ in range(10):
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    # RunError puts the cause on its first line and the kept checkpoint after it.
    text = lines[0] if type(exc).__name__ == "RunError" and lines else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {text}".strip()


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _reached_end(metrics: Mapping[str, Any], config: Mapping[str, Any], spec: TuneSpec) -> bool:
    """Whether a trial without the completion marker still ran its full budget (ASHA
    stops every trial at ``max_t``, before the run's own last report arrives)."""
    total = config.get("total_env_steps", spec.base["total_env_steps"])
    if float(metrics.get("counters/env_steps", 0) or 0) >= total:
        return True
    iterations = config.get("total_iterations", spec.base.get("total_iterations"))
    if iterations is not None and float(metrics.get("counters/iteration", 0) or 0) >= iterations:
        return True
    s = spec.scheduler
    return s.type == "asha" and float(metrics.get(s.time_attr, 0) or 0) >= float(
        s.max_t or math.inf
    )


def _history(result: Any) -> pd.DataFrame | None:
    """Every result a trial reported (Tune's progress file), or None if it never reported."""
    try:
        return result.metrics_dataframe
    except Exception:  # a trial that never reported has no progress file
        return None


def collect_rows(grid: Any, spec: TuneSpec) -> list[dict[str, Any]]:
    """One row per trial: id, status, iterations, env steps, metric (last and best), config, error."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial = (
            Path(result.path).name.removeprefix("trial_")
            if result.path
            else metrics.get("trial_id", "?")
        )
        df = _history(result)
        history = []
        if df is not None and spec.metric in df:
            history = [v for v in (_num(x) for x in df[spec.metric]) if v is not None]
        pick = max if spec.mode == "max" else min
        if result.error is not None:
            status = "ERROR"
        elif metrics.get(COMPLETED_KEY) or _reached_end(metrics, result.config or {}, spec):
            status = "TERMINATED"  # the run reached its end (total_env_steps, stop_return, max_t)
        else:
            status = "STOPPED"  # the scheduler ended it early (or the search was interrupted)
        rows.append(
            {
                "trial": trial,
                "status": status,
                "iterations": int(metrics.get("counters/iteration", 0) or 0),
                "env_steps": int(metrics.get("counters/env_steps", 0) or 0),
                "metric": _num(metrics.get(spec.metric)),
                "metric_best": pick(history) if history else None,
                "config": {k: (result.config or {}).get(k) for k in spec.keys},
                "error": _short_error(result.error),
            }
        )
    rows.sort(key=lambda r: r["trial"])
    return rows


def best_of(grid: Any, spec: TuneSpec) -> dict[str, Any] | None:
    """The best trial by its last ``metric``: dotted overrides, value, best checkpoint."""
    try:
        result = grid.get_best_result(
            metric=spec.metric, mode=spec.mode, scope="last", filter_nan_and_inf=True
        )
    except RuntimeError:  # no trial reported a finite value
        return None
    value = _num((result.metrics or {}).get(spec.metric))
    if value is None:
        return None
    checkpoint = result.get_best_checkpoint(spec.metric, spec.mode) or result.checkpoint
    overrides = spec.overrides_for(result.config or {})
    command = ["rlft-ray", "train", str(spec.run_config)] + [
        f"{k}={_override_value(v)}" for k, v in overrides.items()
    ]
    return {
        "trial": Path(result.path).name.removeprefix("trial_"),
        "metric": spec.metric,
        "mode": spec.mode,
        "value": value,
        "config": {k: (result.config or {}).get(k) for k in spec.keys},
        "overrides": overrides,
        "run_config": str(spec.run_config),
        "checkpoint": checkpoint.path if checkpoint is not None else None,
        "train_command": shlex.join(command),
    }


def _override_value(value: Any) -> str:
    """``value`` as the CLI reads it back (YAML): bare strings where unambiguous."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, separators=(",", ":"))


def count_exploits(exp_path: str) -> int:
    """PBT exploit steps so far (lines of Tune's ``pbt_global.txt``)."""
    path = Path(exp_path) / "pbt_global.txt"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The results as an aligned text table."""
    header = ["trial", "status", "iterations", metric, "best", "config", "error"]
    body = [
        [
            r["trial"],
            r["status"],
            str(r["iterations"]),
            _fmt(r["metric"]),
            _fmt(r["metric_best"]),
            " ".join(f"{k}={_fmt(v)}" for k, v in r["config"].items()),
            r["error"],
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def write_results(
    output_dir: Path,
    spec: TuneSpec,
    rows: list[dict[str, Any]],
    best: dict[str, Any] | None,
    grid: Any,
) -> dict[str, Path]:
    """Write ``results.csv``, ``best.json`` and ``metric_curves.png``; returns their paths."""
    columns = [
        "trial",
        "status",
        "iterations",
        "env_steps",
        spec.metric,
        f"{spec.metric} (best)",
        *spec.keys,
        "error",
    ]
    table = pd.DataFrame(
        [
            {
                "trial": r["trial"],
                "status": r["status"],
                "iterations": r["iterations"],
                "env_steps": r["env_steps"],
                spec.metric: r["metric"],
                f"{spec.metric} (best)": r["metric_best"],
                **{k: r["config"][k] for k in spec.keys},
                "error": r["error"],
            }
            for r in rows
        ],
        columns=columns,
    ).astype({"iterations": "Int64", "env_steps": "Int64"})
    files = {"results": output_dir / "results.csv", "best": output_dir / "best.json"}
    atomic_write_text(files["results"], table.to_csv(index=False))
    atomic_write_json(files["best"], best or {"error": f"no trial reported a finite {spec.metric}"})
    png = plot_trials(output_dir, grid, spec.metric)
    if png is not None:
        files["plot"] = png
    return files


def plot_trials(
    output_dir: Path, grid: Any, metric: str, x_key: str = "counters/iteration"
) -> Path | None:
    """PNG of ``metric`` against ``x_key``, one line per trial; None if nothing was reported."""
    curves = []
    for result in grid:
        df = _history(result)
        if df is None or metric not in df or x_key not in df:
            continue
        df = df[[x_key, metric]].dropna()
        name = Path(result.path).name.removeprefix("trial_")
        curves.append((name, df[x_key].to_numpy(), df[metric].to_numpy()))
    curves.sort(key=lambda c: c[0])
    title = f"{output_dir.name}: {metric} per trial"
    return plot_curves(output_dir / "metric_curves.png", curves, x_key, metric, title)
