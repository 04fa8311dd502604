"""MLflow and W&B (offline) trackers: fed from metrics.jsonl, resumable, never fatal."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import pytest

from rlft_ray.config import ConfigError, TrackingConfig, build_config
from rlft_ray.run.tracking import IDS_FILE, TrackerFeed, check_tracking, mlflow_store_path


def _rows(first: int, last: int) -> list[dict]:
    return [
        {"counters/iteration": i, "loss/policy": 1.0 / i, "reward/mean": 0.1 * i, "note": "x"}
        for i in range(first, last + 1)
    ]


def _append(run: Path, rows: list[dict]) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _mlflow_run(uri: str, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def test_check_tracking_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri: .* cannot be written"):
        check_tracking(TrackingConfig(mlflow_uri=f"file:{tmp_path}/a_file/mlruns"))
    checked = check_tracking(TrackingConfig(mlflow_uri="./mlruns"))
    assert checked.mlflow_uri == (Path.cwd() / "mlruns").as_uri()  # absolute: jobs cd elsewhere
    assert mlflow_store_path("http://host:5000") is None
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri: .*rlft-ray\[tracking\]"):
        check_tracking(TrackingConfig(mlflow_uri="./mlruns"))
    with pytest.raises(ConfigError, match=r"tracking\.wandb_project: .*rlft-ray\[tracking\]"):
        check_tracking(TrackingConfig(wandb_project="p"))
    check_tracking(TrackingConfig())  # off: neither package needed


def test_feed_logs_every_row_to_mlflow_and_wandb_and_resumes_the_same_runs(
    tmp_path: Path,
) -> None:
    run, uri = tmp_path / "run", (tmp_path / "mlruns").as_uri()
    run.mkdir()
    cfg = build_config(
        overrides=[
            "grpo.optim.lr=0.003",
            f"tracking.mlflow_uri={uri}",
            "tracking.wandb_project=rlft-test",
        ]
    )
    _append(run, _rows(1, 2))  # rows of an earlier attempt are not sent again
    feed = TrackerFeed(run, cfg, interval=0.1)
    _append(run, _rows(3, 5))
    time.sleep(0.5)
    _append(run, _rows(6, 7))
    feed.close("completed")

    ids = json.loads((run / IDS_FILE).read_text())
    client, mlrun = _mlflow_run(uri, ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["grpo.optim.lr"] == "0.003"
    history = client.get_metric_history(ids["mlflow"], "loss/policy")
    assert sorted((m.step, m.value) for m in history) == [(i, 1.0 / i) for i in range(3, 8)]
    assert "note" not in mlrun.data.metrics  # strings are not metrics

    wandb_file = next(
        (run / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    )
    data = wandb_file.read_bytes()
    assert b"loss/policy" in data and b"grpo.optim.lr" in data  # offline: on disk, for `wandb sync`

    _append(run, _rows(8, 9))  # --resume: the same MLflow run goes on
    TrackerFeed(run, cfg, interval=0.1).close("interrupted")
    assert json.loads((run / IDS_FILE).read_text())["mlflow"] == ids["mlflow"]
    client, mlrun = _mlflow_run(uri, ids["mlflow"])
    assert mlrun.info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(ids["mlflow"], "loss/policy")) == list(
        range(3, 8)
    )  # rows present before the resume were sent by the first feed, not again


def test_unreachable_server_warns_once_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    cfg = build_config(overrides=[f"tracking.mlflow_uri=http://127.0.0.1:{port}"])
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rlft_ray.run.tracking"):
        feed = TrackerFeed(tmp_path, cfg, interval=0.05)
        _append(tmp_path, _rows(1, 3))
        time.sleep(0.3)
        feed.close("completed")
    assert time.perf_counter() - start < 30
    warnings = [r.getMessage() for r in caplog.records if "mlflow" in r.getMessage().lower()]
    assert len(warnings) == 1 and "tracking is off" in warnings[0]
    assert not (tmp_path / IDS_FILE).exists()
