"""End-to-end runs on local embedded Ray: learning, DDP, resume, actor kill, NaN guard."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from rlft_ray.cli import main
from rlft_ray.config import build_config
from rlft_ray.learners.checkpoint import CheckpointError
from rlft_ray.run.driver import RunError, run_training
from rlft_ray.run.metrics import read_metrics
from rlft_ray.run.resources import ResourceError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CARTPOLE = EXAMPLES / "cartpole_ppo.yaml"
DQN = EXAMPLES / "cartpole_dqn.yaml"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def _returns(rows: list[dict]) -> list[float]:
    return [r["rollout/episode_return_mean"] for r in rows if "rollout/episode_return_mean" in r]


def test_ppo_return_rises_and_run_dir_is_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    mlruns = (tmp_path / "mlruns").as_uri()
    cfg = build_config(
        CARTPOLE,
        [
            "total_env_steps=20480",
            "seed=1",
            "eval_every=20",
            f"tracking.mlflow_uri={mlruns}",
            "tracking.wandb_project=rlft-test",
        ],
    )
    summary = run_training(cfg, out, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 41))
    returns = _returns(rows)
    assert returns[-1] > 2 * returns[0] and returns[-1] > 100, returns
    assert summary["env_steps"] == 20480 and summary["policy_version"] == 40
    assert summary["episode_return_mean"] == pytest.approx(returns[-1])
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "return_curve.png"):
        assert (out / name).is_file(), name
    for name in ("checkpoint_best", "checkpoint_last"):
        assert (out / name / "policy.safetensors").is_file()
    best = json.loads((out / "checkpoint_best" / "score.json").read_text())
    # with eval_every the held-out return chooses checkpoint_best (every evaluation is
    # checkpointed), not the training episodes' return
    assert best["metric"] == "eval/return_mean"
    assert best["value"] == pytest.approx(
        max(r["eval/return_mean"] for r in rows if "eval/return_mean" in r)
    )
    assert summary["checkpoint_best_score"]["metric"] == "eval/return_mean"
    for key in ("loss/policy", "perf/env_steps_per_s", "perf/weight_sync_s", "rollout/policy_lag"):
        assert key in rows[-1]
    # held-out greedy episodes on the env runners every 20 iterations (and after the last)
    evals = {
        int(r["counters/iteration"]): r["eval/return_mean"] for r in rows if "eval/return_mean" in r
    }
    assert sorted(evals) == [20, 40] and evals[40] > 100, evals
    startup = summary["startup"]  # where the wall time outside the iterations went
    assert {"imports_s", "ray_init_s", "train_start_s", "iterations_s"} <= set(startup)
    assert startup["train_start_s"] > 0 and 0 < startup["iterations_s"] < summary["wall_s"]
    # every metric is in TensorBoard too, against the iteration, with the config as text
    scalars, texts, hparams = _tensorboard(out / "tensorboard")
    assert [step for step, _ in scalars["rollout/episode_return_mean"]] == list(range(1, 41))
    assert scalars["loss/policy"][-1][1] == pytest.approx(rows[-1]["loss/policy"], rel=1e-6)
    assert any("total_env_steps: 20480" in t for t in texts)
    assert hparams["total_env_steps"] == 20480 and hparams["ppo.clip_coef"] == 0.2
    # ... and in MLflow (and a W&B offline run) when asked, the run closed as finished
    from mlflow import MlflowClient

    ids = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=mlruns)
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    history = client.get_metric_history(ids["mlflow"], "rollout/episode_return_mean")
    assert sorted(m.step for m in history) == list(range(1, 41))
    assert next((out / "wandb").glob(f"offline-run-*-{ids['wandb']}")).is_dir()
    # the greedy policy of the best checkpoint beats a random one (~22) by far
    assert main(["eval", str(out / "checkpoint_best"), "--episodes", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 5 and result["episode_return_mean"] > 100


def _tensorboard(
    directory: Path,
) -> tuple[dict[str, list[tuple[int, float]]], list[str], dict[str, object]]:
    """Scalars, texts and HParams of the TensorBoard event files in ``directory`` (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    scalars: dict[str, list[tuple[int, float]]] = {}
    texts: list[str] = []
    hparams: dict[str, object] = {}
    for file in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.HasField("tensor"):
                    texts += [t.decode() for t in v.tensor.string_val]
                elif v.tag == "_hparams_/session_start_info":
                    plugin = HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    for key, value in plugin.session_start_info.hparams.items():
                        hparams[key] = getattr(value, value.WhichOneof("kind"))
    return scalars, texts, hparams


@pytest.mark.slow  # 32-34 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_resume_continues_counters(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = build_config(
        CARTPOLE, ["total_env_steps=5120", "checkpoint_every=5", "report_interval_s=0"]
    )
    run_training(first, out, progress=False)
    state = json.loads((out / "checkpoint_last" / "state.json").read_text())["counters"]
    assert (state["iteration"], state["env_steps"], state["policy_version"]) == (10, 5120, 10)
    more = build_config(CARTPOLE, ["total_env_steps=8192", "checkpoint_every=5"])
    with pytest.raises(RunError, match="already holds a run"):
        run_training(more, out, progress=False)
    shutil.rmtree(out / "ray_train")  # Ray Train's storage is not what a resume reads
    summary = run_training(more, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 17))
    assert [r["counters/env_steps"] for r in rows] == [512 * i for i in range(1, 17)]
    assert rows[10]["counters/policy_version"] == 11
    assert rows[10]["time/wall_s"] > rows[9]["time/wall_s"]
    assert summary["env_steps"] == 8192


@pytest.mark.slow  # 37-45 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_a_fresh_run_never_continues_a_foreign_checkpoint(tmp_path: Path) -> None:
    """Two runs with one shared storage_path and the same run-directory name: the second
    starts at iteration 1 (Ray Train would find the first one's state and continue it)."""
    cfg = build_config(
        CARTPOLE,
        ["total_env_steps=2048", "checkpoint_every=2", f"resources.storage_path={tmp_path / 's'}"],
    )
    run_training(cfg, tmp_path / "a" / "run", progress=False)
    run_training(cfg, tmp_path / "b" / "run", progress=False)
    assert [r["counters/iteration"] for r in read_metrics(tmp_path / "b" / "run")] == [1, 2, 3, 4]


@pytest.mark.slow  # 37-45 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_dqn_resume_keeps_its_replay(tmp_path: Path) -> None:
    out = tmp_path / "dqn"
    common = [
        "checkpoint_every=5",
        "report_interval_s=0",
        "dqn.learning_starts=256",
        "dqn.updates_per_iteration=4",
    ]
    run_training(build_config(DQN, ["total_env_steps=1280", *common]), out, progress=False)
    with np.load(out / "checkpoint_last" / "rank_state" / "0.npz") as saved:
        assert len(saved["obs"]) == 1280
        assert int(saved["grad_steps"]) == 4 * 9  # iteration 1 only fills the replay
    two = build_config(DQN, ["total_env_steps=1536", "resources.num_learners=2", *common])
    with pytest.raises(CheckpointError, match="1 learner rank.*num_learners=2"):
        run_training(two, out, resume=True, progress=False)  # fails before any Ray work
    more = build_config(DQN, ["total_env_steps=1536", *common])
    run_training(more, out, resume=True, progress=False)
    rows = read_metrics(out)
    assert [r["counters/iteration"] for r in rows] == list(range(1, 13))
    # the first resumed iteration adds to the saved replay and keeps learning at once
    assert rows[10]["replay/size"] == 1280 + 128 and "loss/td" in rows[10]
    assert rows[10]["counters/grad_steps"] == 4 * 9 + 4


def test_ddp_two_learners_learn(tmp_path: Path) -> None:
    cfg = build_config(
        CARTPOLE,
        [
            "total_env_steps=20480",
            "seed=1",
            "resources.num_learners=2",
            "resources.cpus_per_learner=0.5",
            "resources.cpus_per_rollout_actor=0.25",
        ],
    )
    summary = run_training(cfg, tmp_path / "ddp", progress=False)
    rows = read_metrics(tmp_path / "ddp")
    returns = _returns(rows)
    # two ranks, one runner each: every iteration still covers both runners' 512 steps
    assert rows[0]["counters/env_steps"] == 512 and summary["env_steps"] == 20480
    assert returns[-1] > 2 * returns[0] and returns[-1] > 100, returns


@pytest.mark.slow  # 32-34 s end to end: the default suite stays under 10 minutes on slower CPUs
def test_killed_env_runner_is_restarted_and_run_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = build_config(CARTPOLE, ["total_env_steps=25600", "report_interval_s=0"])
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_training(cfg, out, progress=False)))
    thread.start()
    deadline = time.monotonic() + 120
    while len(read_metrics(out)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    victims = [
        a for a in ray.util.list_named_actors() if a.startswith("rlft-runner-") and a.endswith("-0")
    ]
    assert victims, "no rollout actor found"
    ray.kill(ray.get_actor(victims[0]), no_restart=False)
    thread.join(timeout=180)
    assert not thread.is_alive()
    rows = read_metrics(out)
    assert result["env_steps"] == 25600
    assert max(r["perf/actor_restarts"] for r in rows) >= 1


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = build_config(
        None,
        [
            "env.id=rlft/NaNReward-v0",
            "env.kwargs={nan_after_steps: 1000}",
            "checkpoint_every=1",
            "total_env_steps=20000",
            "resources.max_failures=-1",  # a NaN would repeat: never retried
        ],
    )
    with pytest.raises(RunError, match=r"NonFiniteLossError: loss/total became nan") as info:
        run_training(cfg, out, progress=False)
    assert f"last good checkpoint: {out / 'checkpoint_last'}" in str(info.value)
    state = json.loads((out / "checkpoint_last" / "state.json").read_text())["counters"]
    assert state["iteration"] >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["error"].startswith("NonFiniteLossError")
    assert (summary["status"], summary["learner_restarts"]) == ("failed", 0)


def test_run_that_cannot_be_placed_fails_with_numbers(tmp_path: Path) -> None:
    cfg = build_config(CARTPOLE, ["resources.num_rollout_actors=8"])
    with pytest.raises(
        ResourceError,
        match=r"needs 5 CPUs \(8 rollout actors x 0.5 \+ 1 learners x 1\), cluster has 2",
    ):
        run_training(cfg, tmp_path / "big", progress=False)


@pytest.mark.slow
def test_async_rollouts_sample_one_version_behind_and_still_learn(tmp_path: Path) -> None:
    """Overlapped sampling: every batch after the first comes from the weights one update
    behind (recorded per batch), and PPO's ratio against the recorded log-probs still
    learns."""
    cfg = build_config(
        CARTPOLE, ["total_env_steps=16384", "seed=1", "async_rollouts=true", "checkpoint_every=8"]
    )
    run_training(cfg, tmp_path / "a", progress=False)
    rows = read_metrics(tmp_path / "a")
    assert [r["rollout/policy_lag"] for r in rows] == [0.0] + [1.0] * (len(rows) - 1)
    returns = _returns(rows)
    assert returns[-1] > 2 * returns[0], returns
