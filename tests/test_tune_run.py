"""A real (tiny) Ray Tune search: results files, a crashing trial, eval/init_from of the
best checkpoint, and ``--resume``."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from rlft_ray.cli import main
from rlft_ray.config import build_config
from rlft_ray.run.driver import RunError, run_training
from rlft_ray.run.metrics import read_metrics
from rlft_ray.tune import SpecError, run_search

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ROOT / "examples" / "cartpole_ppo.yaml"
METRIC = "rollout/episode_return_mean"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _write_spec(path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "run_config": str(CARTPOLE),
        # rlft/NaNReward-v0 is CartPole whose rewards turn NaN after `nan_after_steps`:
        # the trial with 10 crashes on its first update, the other one runs to the end.
        "overrides": {
            "env.id": "rlft/NaNReward-v0",
            "total_env_steps": 2048,
            "checkpoint_every": 2,
            "report_interval_s": 0.0,
        },
        "resources": {
            "num_rollout_actors": 1,
            "cpus_per_rollout_actor": 0.25,
            "cpus_per_learner": 0.5,
        },
        "search_space": {"env.kwargs.nan_after_steps": {"grid": [1_000_000, 10]}},
        "scheduler": {"type": "fifo"},
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "metric": METRIC,
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow  # a 4-trial Tune search end to end: 36 s of the default suite
def test_tiny_search_writes_results_and_lists_the_crashed_trial(
    local_ray, tmp_path: Path, capsys
) -> None:
    mlruns = (tmp_path / "mlruns").as_uri()  # trials go to MLflow through Tune's callback
    spec = _write_spec(tmp_path / "spec.yaml")
    data = yaml.safe_load(spec.read_text())
    data["overrides"]["tracking.mlflow_uri"] = mlruns
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "search"
    result = run_search(spec, out, verbose=0)

    by_steps = {r["config"]["env.kwargs.nan_after_steps"]: r for r in result.rows}
    good, bad = by_steps[1_000_000], by_steps[10]
    assert good["status"] == "TERMINATED" and good["error"] == ""
    assert good["iterations"] == 8 and good["env_steps"] == 2048 and good["metric"] > 0
    assert bad["status"] == "ERROR"
    assert "NonFiniteLossError" in bad["error"] or "nan" in bad["error"].lower(), bad["error"]

    # results.csv: one row per trial with config, metric, iterations, status, error
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"TERMINATED", "ERROR"}
    assert set(rows[0]) >= {
        "trial",
        "status",
        "iterations",
        METRIC,
        "env.kwargs.nan_after_steps",
        "error",
    }

    # best.json: best config as dotted overrides, metric, checkpoint path
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == good["trial"] and best["metric"] == METRIC
    assert best["value"] == pytest.approx(good["metric"])
    assert best["config"] == {"env.kwargs.nan_after_steps": 1_000_000}
    assert (
        best["overrides"]["total_env_steps"] == 2048
        and best["overrides"]["env.id"] == "rlft/NaNReward-v0"
    )
    assert "env.kwargs.nan_after_steps=1000000" in best["train_command"]
    checkpoint = Path(best["checkpoint"])
    assert (checkpoint / "policy.safetensors").is_file() and (checkpoint / "config.yaml").is_file()
    assert (out / "metric_curves.png").stat().st_size > 0
    assert (out / "spec.yaml").is_file()
    # each trial's own run directory, as written by a plain `rlft-ray train`
    run_dir = out / "trials" / good["trial"] / "run0"
    assert len(read_metrics(run_dir)) == 8 and (run_dir / "summary.json").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlruns)
    runs = client.search_runs([client.get_experiment_by_name("rlft_ray").experiment_id])
    assert sorted(r.data.params["env.kwargs.nan_after_steps"] for r in runs) == ["10", "1000000"]
    finished = next(r for r in runs if r.data.params["env.kwargs.nan_after_steps"] == "1000000")
    assert finished.data.metrics[METRIC] == pytest.approx(good["metric"])

    # the best checkpoint works with `rlft-ray eval` ...
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 2
    # ... and as init_from of a new run
    cfg = build_config(
        CARTPOLE,
        {
            "init_from": str(checkpoint),
            "total_env_steps": 512,
            "resources.num_rollout_actors": 1,
            "resources.cpus_per_rollout_actor": 0.5,
        },
    )
    summary = run_training(cfg, tmp_path / "finetune", progress=False)
    assert summary["env_steps"] == 512 and summary["error"] is None

    # --resume of a finished search restores it and rewrites the same results
    again = run_search(spec, out, resume=True, verbose=0)
    assert [(r["trial"], r["status"]) for r in again.rows] == [
        (r["trial"], r["status"]) for r in result.rows
    ]
    with pytest.raises(SpecError, match="already holds a search"):
        run_search(spec, out, verbose=0)
    changed = _write_spec(tmp_path / "changed.yaml", num_samples=2)
    with pytest.raises(SpecError, match="differs from the spec the search started with"):
        run_search(changed, out, resume=True, verbose=0)


def test_schedulers_that_stop_trials_need_the_dashboard(local_ray, tmp_path: Path) -> None:
    # Ray Train frees a stopped trial's learners through the state API (dashboard);
    # without it ASHA/PBT would leak CPUs until later trials wait forever.
    spec = _write_spec(tmp_path / "spec.yaml", scheduler={"type": "asha", "max_t": 2048})
    with pytest.raises(RunError, match="without its dashboard"):
        run_search(spec, tmp_path / "search", verbose=0)
    assert not (tmp_path / "search" / "spec.yaml").exists()


def test_resume_without_a_search(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path / "spec.yaml")
    with pytest.raises(SpecError, match="holds no search to resume"):
        run_search(spec, tmp_path / "nothing", resume=True, verbose=0)
    assert main(["tune", str(spec), "--resume"]) == 2  # --resume needs --output-dir


@pytest.mark.slow
def test_interrupted_search_resumes_from_trial_checkpoints(tmp_path: Path) -> None:
    """Ctrl-C during `rlft-ray tune`, then `--resume`: the unfinished trial continues from
    its last Tune checkpoint (counters go on) instead of starting over."""
    spec = _write_spec(
        tmp_path / "spec.yaml",
        overrides={"total_env_steps": 12800, "checkpoint_every": 5, "report_interval_s": 0.0},
        search_space={"ppo.lr": {"grid": [1e-3]}},
        max_concurrent_trials=1,
    )
    out = tmp_path / "search"
    if ray.is_initialized():
        ray.shutdown()  # one Ray instance at a time: the search runs in its own process
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlft_ray", "tune", str(spec), "--output-dir", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("tune/trial_*/checkpoint_000001")):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "search ended before a checkpoint"
            )
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Tune saves the experiment state and exits
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        result = run_search(spec, out, resume=True, verbose=0)
    finally:
        ray.shutdown()
    (row,) = result.rows
    assert row["status"] == "TERMINATED" and row["env_steps"] == 12800
    runs = sorted((out / "trials" / row["trial"]).glob("run*"))
    assert len(runs) == 2, runs
    first_after_resume = read_metrics(runs[1])[0]["counters/iteration"]
    assert first_after_resume > 1 and (first_after_resume - 1) % 5 == 0
