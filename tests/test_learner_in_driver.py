"""The learner in the driver: Ray Train's local mode on Ray the run started itself
(``resources.learner_in_driver``). Same loop, same outputs as a Ray Train worker; a
learner error is a failure that is reported and retried the same way; a signal never
cuts a write of the run directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlft_ray.config import build_config
from rlft_ray.learners.ppo import PPOLearner
from rlft_ray.rollout.shared_weights import PREFIX, SharedWeights
from rlft_ray.run.attempts import Attempts, Interrupt, _DeferSignals
from rlft_ray.run.driver import RunError, run_training
from rlft_ray.run.metrics import read_metrics
from rlft_ray.run.ray_session import embedded_here, init_ray, shutdown_ray

CARTPOLE = Path(__file__).resolve().parent.parent / "examples" / "cartpole_ppo.yaml"
# 10 iterations of 512 env steps, a checkpoint every 5, a row per iteration
SHORT = ["total_env_steps=5120", "checkpoint_every=5", "report_interval_s=0", "seed=3"]


@pytest.fixture(scope="module")
def embedded() -> Iterator[None]:
    """Ray started the way ``rlft-ray train`` starts it (``init_ray`` without an address)."""
    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    assert embedded_here()
    yield
    shutdown_ray()
    assert not embedded_here()


@pytest.fixture
def update_pids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The process of every PPO update this test process sees (a worker's are not seen)."""
    pids: list[int] = []
    update = PPOLearner.update

    def spy(self: PPOLearner, batch: Any, progress: float) -> dict[str, float]:
        pids.append(os.getpid())
        return update(self, batch, progress)

    monkeypatch.setattr(PPOLearner, "update", spy)
    return pids


def _train(out: Path, *overrides: str) -> dict[str, Any]:
    return run_training(build_config(CARTPOLE, [*SHORT, *overrides]), out, progress=False)


def _learning(out: Path) -> list[tuple[float, ...]]:
    """Per iteration: counters, return and losses (not timings)."""
    keys = ("counters/env_steps", "rollout/episode_return_mean", "loss/policy", "loss/value")
    return [tuple(r.get(k, float("nan")) for k in keys) for r in read_metrics(out)]


def test_the_learner_runs_in_the_driver_and_learns_what_a_train_worker_learns(
    embedded: None, tmp_path: Path, update_pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    shared: list[str] = []  # the driver publishes through shared memory, a worker does not
    write = SharedWeights.write
    monkeypatch.setattr(
        SharedWeights, "write", lambda s, *a: shared.append(str(s.directory)) or write(s, *a)
    )
    here = _train(tmp_path / "driver")
    assert update_pids == [os.getpid()] * 10  # every update ran in this process
    assert not any((tmp_path / "driver" / "ray_train").rglob("checkpoint_*"))  # no controller
    assert len(shared) == 11  # the first weights, then one version per iteration
    assert not [p for p in Path("/dev/shm").glob(f"{PREFIX}{os.getpid()}_*")]  # removed

    update_pids.clear()
    worker = _train(tmp_path / "worker", "resources.learner_in_driver=false")
    assert update_pids == []  # a Ray Train worker process updated
    assert any((tmp_path / "worker" / "ray_train").rglob("checkpoint_*"))
    assert len(shared) == 11  # the worker published through the object store

    assert _learning(tmp_path / "driver") == _learning(tmp_path / "worker")
    for key in ("status", "iterations", "env_steps", "episode_return_mean", "policy_version"):
        assert here[key] == worker[key], key
    assert here["status"] == "completed" and here["iterations"] == 10
    for run in ("driver", "worker"):
        state = json.loads((tmp_path / run / "checkpoint_last" / "state.json").read_text())
        assert state["counters"]["iteration"] == 10
        score = json.loads((tmp_path / run / "checkpoint_best" / "score.json").read_text())
        assert score["iteration"] in (5, 10)


def test_the_caller_gets_its_threads_and_random_state_back(embedded: None, tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the learner sets 1 (the CPUs it holds)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    try:
        _train(tmp_path / "driver", "total_env_steps=1024")  # seeds everything with seed=3
        assert torch.get_num_threads() == threads + 1
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    finally:
        torch.set_num_threads(threads)


def test_a_learner_error_in_the_driver_is_retried_then_reported(
    embedded: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = PPOLearner.update
    calls = {"n": 0}

    def fails_at_7(self: PPOLearner, batch: Any, progress: float) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected learner error")
        return update(self, batch, progress)

    monkeypatch.setattr(PPOLearner, "update", fails_at_7)
    done = _train(tmp_path / "retried", "resources.max_failures=1")
    # restarted from checkpoint_last (iteration 5); rows 6.. written once more, exactly once
    assert (done["status"], done["learner_restarts"]) == ("completed", 1)
    rows = read_metrics(tmp_path / "retried")
    assert [int(r["counters/iteration"]) for r in rows] == list(range(1, 11))
    assert calls["n"] == 6 + 1 + 5  # 1..6 ok, the 7th raised, then iterations 6..10

    calls["n"] = 0
    with pytest.raises(RunError, match="RuntimeError: injected learner error") as info:
        _train(tmp_path / "failed")  # max_failures 0
    assert f"last good checkpoint: {tmp_path / 'failed' / 'checkpoint_last'}" in str(info.value)
    summary = json.loads((tmp_path / "failed" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["learner_restarts"] == 0
    assert summary["error"] == "RuntimeError: injected learner error"


class _Writes:
    def __init__(self, attempts: Attempts) -> None:
        self.attempts, self.calls = attempts, 0

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        # a signal in the middle of the write: noted, not raised here
        self.attempts.on_signal(15)
        self.calls += 1


def test_a_signal_during_a_run_directory_write_stops_the_run_after_it() -> None:
    attempts = Attempts.__new__(Attempts)
    attempts.signum, attempts.reporting, attempts.trainer = None, False, None
    writes = _Writes(attempts)
    deferred = _DeferSignals(writes, attempts)  # type: ignore[arg-type]
    with pytest.raises(Interrupt) as info:
        deferred.after_report(None, [{}], None)
    assert writes.calls == 1 and info.value.signum == 15  # the write finished first
    assert attempts.reporting is False
    with pytest.raises(Interrupt):  # outside a write the signal stops at once
        attempts.on_signal(15)


def test_the_progress_bar_reads_only_new_whole_rows(tmp_path: Path) -> None:
    from rlft_ray.run.metrics import METRICS_FILE
    from rlft_ray.run.progress import ProgressBar

    metrics = tmp_path / METRICS_FILE
    metrics.write_text(json.dumps({"counters/iteration": 1}) + "\n")  # a resumed run's row
    bar = ProgressBar(tmp_path, build_config(CARTPOLE, []), "rollout/episode_return_mean")
    bar.stop.set()
    bar.thread.join()
    assert bar._last_new_row() is None  # rows from before the bar are not new
    with metrics.open("a") as f:
        f.write(json.dumps({"counters/iteration": 2}) + "\n" + '{"counters/iter')  # torn
    assert bar._last_new_row() == {"counters/iteration": 2}
    with metrics.open("a") as f:
        f.write('ation": 3}\n')  # the torn row completed
    assert bar._last_new_row() == {"counters/iteration": 3}
    assert bar._last_new_row() is None
    metrics.write_text(json.dumps({"counters/iteration": 1}) + "\n")  # a restart truncated it
    assert bar._last_new_row() == {"counters/iteration": 1}
    bar.bar.close()


def test_only_a_local_one_cpu_learner_without_tune_or_ray_data_runs_in_the_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pandas as pd

    from rlft_ray.learners.base import TaskProbe
    from rlft_ray.run import attempts

    def in_driver(
        *overrides: str, embedded: bool = True, callbacks: tuple = (), rows: int = 10
    ) -> bool:
        monkeypatch.setattr(attempts, "embedded_here", lambda: embedded)
        cfg = build_config(CARTPOLE, list(overrides))
        table = pd.DataFrame({"x": range(rows)})
        probe = TaskProbe(spaces=None, datasets={"prompts": table})  # type: ignore[arg-type]
        fit = Attempts(cfg, probe, [], tmp_path, PPOLearner, callbacks, None)
        return fit.in_driver

    assert in_driver()
    assert not in_driver(embedded=False)  # a cluster (--address, RAY_ADDRESS, ray job submit)
    assert not in_driver(callbacks=(object(),))  # a Tune trial reports through its callback
    assert not in_driver("resources.learner_in_driver=false")
    assert not in_driver("resources.num_learners=2")  # DDP
    assert not in_driver("resources.use_gpu=true")
    assert not in_driver(rows=attempts.INLINE_ROWS + 1)  # streamed through Ray Data


def test_an_actor_whose_shared_slot_was_overwritten_is_restored_with_the_weights(
    embedded: None, tmp_path: Path
) -> None:
    import ray
    import torch

    from rlft_ray.learners.base import LearnerContext, Spaces
    from rlft_ray.rollout.env_runner import EnvRunner, probe_spaces
    from rlft_ray.rollout.group import RunnerGroup, make_remote_runners
    from rlft_ray.rollout.shared_weights import SLOTS

    cfg = build_config(CARTPOLE, ["seed=3"])
    learner = PPOLearner(cfg, Spaces(*probe_spaces(cfg.env)), LearnerContext())
    [actor] = make_remote_runners(
        EnvRunner, 1, 0.5, 1, "rlft-shared-test-", lambda i: PPOLearner.sampler_kwargs(cfg, i)
    )
    shared = SharedWeights(tmp_path)
    runners = RunnerGroup([actor], mine=[0], sample_timeout_s=60, shared=shared)
    weights = learner.policy_state()
    # version 1's slot is overwritten before the actor reads it: its load fails, so it
    # still holds no version, and the group restores it with the weights themselves
    slot = shared.write(weights, 1)
    shared.write({k: torch.zeros_like(v) for k, v in weights.items()}, 1 + SLOTS)
    with pytest.raises(ray.exceptions.RayTaskError, match="StaleWeightsError"):
        ray.get(actor.set_weights.remote(slot, 1), timeout=60)
    [batch] = runners.sample(lambda: (weights, 1), 64, version=1)
    assert batch.policy_version == 1 and runners.restarts == 1
    shared.close()
