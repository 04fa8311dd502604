"""Fault injection: runs you can trust.

Real runs in their own processes (SIGTERM and SIGKILL the driver, kill it between Ray
registering a checkpoint and ``checkpoint_last`` being replaced, a hanging reward
function) and the pieces that make them safe (the run-directory lock, checkpoints that
are never unpickled, eval that runs no code a checkpoint names, a checkpoint copy that
fails half-way, a bounded connection to a dead cluster). Long cases are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray.train import Checkpoint

from rlft_ray.apps.evaluate import eval_config, eval_fn_source
from rlft_ray.cli import main
from rlft_ray.config import ConfigError, build_config
from rlft_ray.learners.checkpoint import (
    CheckpointError,
    load_training_state,
    rng_state,
    set_rng_state,
)
from rlft_ray.run.callback import RunDirCallback
from rlft_ray.run.lock import LOCK_FILE, RunDirBusyError, RunDirLock
from rlft_ray.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CARTPOLE = ROOT / "examples" / "cartpole_ppo.yaml"
GRPO = ROOT / "examples" / "arithmetic_grpo.yaml"
# CartPole PPO: 512 env steps an iteration, a checkpoint every 5, a row per iteration.
FAST = ["checkpoint_every=5", "report_interval_s=0"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **extra}


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m rlft_ray *args`` (or ``python *args`` for a script) in its own session,
    so that the test can kill it together with the embedded Ray it starts."""
    cmd = (
        [sys.executable, *args]
        if args[0].endswith(".py")
        else [sys.executable, "-m", "rlft_ray", *args]
    )
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env or _env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _iterations(out: Path) -> list[int]:
    return [int(r["counters/iteration"]) for r in read_metrics(out)]


def _last_iteration(out: Path) -> int:
    state = json.loads((out / "checkpoint_last" / "state.json").read_text())
    return int(state["counters"]["iteration"])


def _resume(out: Path, log: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        "train",
        str(CARTPOLE),
        *overrides,
        "--resume",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    return subprocess.run(
        [sys.executable, "-m", "rlft_ray", *cmd],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _leftovers(out: Path) -> list[str]:
    """Temp files and directories of interrupted writes, and a lock nobody holds."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _assert_exactly_once(out: Path, total: int) -> None:
    rows = read_metrics(out)
    assert _iterations(out) == list(range(1, total + 1))
    assert [int(r["counters/env_steps"]) for r in rows] == [512 * i for i in range(1, total + 1)]
    assert [int(r["counters/policy_version"]) for r in rows] == list(range(1, total + 1))


# -- whole runs -----------------------------------------------------------------------


def test_sigterm_writes_an_interrupted_summary_refuses_a_second_writer_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    overrides = ["total_env_steps=12800", *FAST]
    proc = _spawn(
        ["train", str(CARTPOLE), *overrides, "--output-dir", str(out), "--no-progress"], log
    )
    try:
        _wait_for(
            lambda: (out / "checkpoint_last").is_dir() and len(read_metrics(out)) >= 7, proc, log
        )
        # a second writer (here a --resume) is refused while the run holds the directory
        assert main(["train", str(CARTPOLE), *overrides, "--resume", "--output-dir", str(out)]) == 1
        assert f"in use by pid {proc.pid}" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        _kill_group(proc)
    assert rc == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert stopped_in < 30
    assert "interrupted by SIGTERM" in log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert _leftovers(out) == []  # no temp directories, the lock released
    done = _resume(out, tmp_path / "resume.log", overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_exactly_once(out, 25)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_resume(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    overrides = ["total_env_steps=10240", "checkpoint_every=100", "report_interval_s=0"]
    proc = _spawn(
        ["train", str(CARTPOLE), *overrides, "--output-dir", str(out), "--no-progress"], log
    )
    try:
        _wait_for(lambda: len(read_metrics(out)) >= 3, proc, log)
    finally:
        _kill_group(proc)  # the whole machine goes down: driver and Ray
    assert not (out / "checkpoint_last").exists() and (out / LOCK_FILE).exists()
    done = _resume(out, tmp_path / "resume.log", overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no checkpoint yet; starting again from iteration 0" in done.stderr
    _assert_exactly_once(out, 20)


KILL_BEFORE_LAST = """
import os, signal, sys, time
import rlft_ray.run.attempts as attempts
import rlft_ray.run.driver as driver
from rlft_ray.config import build_config
from rlft_ray.run.callback import RunDirCallback

DRIVER = os.getpid()


class KillBeforeLast(RunDirCallback):
    # Runs in the Ray Train controller after Ray registered the checkpoint: the rows up to
    # it are written, then the driver dies before checkpoint_last is replaced.
    def _materialize(self, checkpoint, name):
        self.seen = getattr(self, "seen", 0) + (name == "checkpoint_last")
        if name == "checkpoint_last" and self.seen == 2:
            os.kill(DRIVER, signal.SIGKILL)
            time.sleep(60)
        return super()._materialize(checkpoint, name)


attempts.RunDirCallback = KillBeforeLast
cfg = build_config(sys.argv[1], sys.argv[3:])
driver.run_training(cfg, sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_sigkill_between_checkpoint_registration_and_checkpoint_last(tmp_path: Path) -> None:
    out, log, script = tmp_path / "run", tmp_path / "run.log", tmp_path / "kill.py"
    script.write_text(KILL_BEFORE_LAST)
    overrides = ["total_env_steps=10240", *FAST]
    proc = _spawn([str(script), str(CARTPOLE), str(out), *overrides], log)
    try:
        rc = proc.wait(timeout=180)
    finally:
        _kill_group(proc)
    assert rc == -signal.SIGKILL, log.read_text()[-2000:]
    assert _last_iteration(out) == 5 and _iterations(out)[-1] == 10  # rows ran ahead of it
    done = _resume(out, tmp_path / "resume.log", overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_exactly_once(out, 20)
    assert _leftovers(out) == []


HANGING_REWARD = """
import time


def reward(prompts, completions, metadata):
    # Answers the check on one row (its answer as the completion); hangs on real samples.
    if all(c == str(m.get("answer")) for c, m in zip(completions, metadata)):
        return [1.0] * len(completions)
    time.sleep(3600)
"""


@pytest.mark.slow
def test_hanging_reward_function_fails_within_bounds_naming_the_actor(
    model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "hangmod.py").write_text(HANGING_REWARD)
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = [
        "train",
        str(GRPO),
        f"lm.model={model_dir}",
        "lm.reward_fn=hangmod:reward",
        "lm.eval_prompts=null",
        "lm.max_new_tokens=4",
        "total_iterations=3",
        "resources.sample_timeout_s=5",
        "resources.max_failures=2",  # a deterministic failure is still not retried
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    started = time.monotonic()
    proc = _spawn(args, log, env=_env(PYTHONPATH=str(tmp_path)))
    try:
        rc = proc.wait(timeout=240)
    finally:
        _kill_group(proc)
    assert rc == 1 and time.monotonic() - started < 200
    text = log.read_text()
    assert "SamplingTimeoutError: rollout actor 0 did not answer a sampling call within 5 s" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["learner_restarts"] == 0


# -- the pieces -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_fails_fast_naming_the_address(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"  # a head that died: nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlft_ray",
            "train",
            str(CARTPOLE),
            "--output-dir",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        env=_env(RAY_ADDRESS=address),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and time.monotonic() - started < 30
    assert f"cannot reach the Ray cluster at {address} (RAY_ADDRESS)" in done.stderr
    assert "ray start --head" in done.stderr
    assert not (tmp_path / "r").exists()


def test_a_local_run_starts_embedded_ray_unless_a_cluster_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    from rlft_ray.run import ray_session

    seen: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.append(address))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(ray_session.NO_DASHBOARD_ENV, raising=False)  # set by the local start
    ray_session.init_ray()  # never the head an earlier `ray start` recorded
    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray_session.init_ray()
    assert seen == ["local", "local"]


def test_an_early_started_instance_is_the_one_runs_use_and_stops_with_its_agents() -> None:
    # `rlft-ray train` starts local Ray on a background thread while the driver imports
    # and checks its input; the run then uses that instance, and shutdown_ray stops
    # every process of it (a thread that left early would orphan the raylet's agents).
    import psutil
    import ray
    from ray.train import ScalingConfig

    from rlft_ray.run import ray_session
    from rlft_ray.run.attempts import _Trainer

    if ray.is_initialized():
        ray.shutdown()
    ray_session.start_ray_early(preload="rlft_ray.rollout.env_runner")
    ray_session.init_ray()  # waits for the background start instead of starting another
    try:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] >= 1
        assert ray_session.embedded_here()  # so a run's one CPU learner runs in the driver
        # the rollout actors' module: imported by Ray's first worker processes at their start
        preloaded = ray.remote(lambda: "rlft_ray.rollout.env_runner" in sys.modules)
        assert ray.get(preloaded.remote(), timeout=60) is True
        started = psutil.Process().children(recursive=True)
        assert any("raylet" in p.name() for p in started), [p.name() for p in started]
        # nor Ray's API server or autoscaler monitor, which a local run never uses
        commands = [" ".join(p.cmdline()) for p in started]
        assert not [c for c in commands if "dashboard.py" in c or "_private/monitor.py" in c]
        # no dashboard: Ray Train's cleaner, which polls its state API, is left out
        assert os.environ[ray_session.NO_DASHBOARD_ENV] == "1"
        trainer = _Trainer(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        names = [type(c).__name__ for c in trainer._create_default_callbacks()]
        assert "PlacementGroupCleanerCallback" not in names and "BackendSetupCallback" in names
        assert "DatasetsCallback" not in names  # no Ray Dataset: no dataset-manager actor
        with_data = _Trainer(
            lambda config: None,
            scaling_config=ScalingConfig(num_workers=1),
            datasets={"d": ray.data.from_items([{"x": 1}])},
        )
        assert "DatasetsCallback" in [
            type(c).__name__ for c in with_data._create_default_callbacks()
        ]
    finally:
        ray_session.shutdown_ray()
    assert not ray.is_initialized() and ray_session.NO_DASHBOARD_ENV not in os.environ
    assert not ray_session.embedded_here()
    _, alive = psutil.wait_procs(started, timeout=20)
    assert not alive, [p.name() for p in alive]
    trainer = _Trainer(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" in names  # Ray's default elsewhere


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": time.time()})
        )
        with pytest.raises(RunDirBusyError, match=rf"in use by pid {holder.pid} on "):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path):  # the holder is gone: a stale lock is taken over
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusyError):
            other = RunDirLock(tmp_path)
            other._stale = lambda holder: False  # as seen from another live process
            other.acquire()
    assert not (tmp_path / LOCK_FILE).exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the marker file
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_files_are_never_unpickled(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "policy.safetensors").write_bytes(b"")
    (ckpt / "state.json").write_text(json.dumps({"counters": {}, "algo": "ppo", "spaces": {}}))
    marker = tmp_path / "pwned"
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(CheckpointError, match="optimizer.pt: not a plain optimizer state"):
        load_training_state(ckpt, optimizer)
    assert not marker.exists()
    # RNG state is plain JSON and restores every generator exactly
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    (tmp_path / "rng.json").write_text(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(tmp_path / "rng.json")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    (tmp_path / "bad.json").write_text('{"python": 1}')
    with pytest.raises(CheckpointError, match="unreadable RNG state"):
        set_rng_state(tmp_path / "bad.json")


def test_eval_runs_no_code_a_checkpoint_names() -> None:
    crafted = build_config(
        GRPO,
        [
            "lm.trust_remote_code=true",
            "lm.reward_fn=evil.module:run",
            "lm.eval_fn=evil.module:run",
        ],
    )
    cfg = eval_config(crafted, [])
    default = build_config(GRPO)
    assert cfg.lm.trust_remote_code is False
    assert (cfg.lm.reward_fn, cfg.lm.eval_fn) == (default.lm.reward_fn, default.lm.eval_fn)
    # the command line may still choose them
    assert eval_config(crafted, ["lm.eval_fn=envs.arithmetic:numeric_match"]).lm.eval_fn == (
        "envs.arithmetic:numeric_match"
    )
    # a reward this package ships runs no foreign code: the run's own is used, and said so
    built_in = build_config(GRPO, ["lm.eval_fn=rlft_ray.rewards:final_number"])
    assert eval_config(built_in, []).lm.eval_fn == "rlft_ray.rewards:final_number"
    assert "(the run's)" in eval_fn_source(built_in, eval_config(built_in, []), [])
    note = eval_fn_source(crafted, cfg, [])
    assert "evil.module:run is not built in" in note and "pass lm.eval_fn=evil.module:run" in note
    gym = build_config(CARTPOLE, ["env.id=evil.module:Env-v0"])
    with pytest.raises(ConfigError, match="env.id: .*would import module 'evil.module'"):
        eval_config(gym, [])
    assert eval_config(gym, ["env.id=CartPole-v1"]).env.id == "CartPole-v1"


def test_a_failed_checkpoint_copy_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, new = tmp_path / "run", tmp_path / "new"
    (out / "checkpoint_last").mkdir(parents=True)
    (out / "checkpoint_last" / "policy.safetensors").write_text("old")
    new.mkdir()
    (new / "policy.safetensors").write_text("new")

    def disk_full(self: Checkpoint, path: str) -> None:
        Path(path, "policy.safetensors").write_text("ne")  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Checkpoint, "to_directory", disk_full)
    row = {"counters/iteration": 5.0, "reward/mean": 1.0}
    with pytest.raises(OSError, match="No space left"):
        RunDirCallback(str(out), "reward/mean").after_report(
            None, [dict(row)], Checkpoint.from_directory(str(new))
        )
    assert (out / "checkpoint_last" / "policy.safetensors").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_last", "metrics.jsonl"]


def test_a_replace_cut_between_its_renames_is_undone_on_resume(tmp_path: Path) -> None:
    """Killed between moving the old checkpoint_last aside and renaming the new one in:
    the old (whole) copy comes back, the unfinished new one and temp files go."""
    from rlft_ray.run.lock import remove_temp_files

    (tmp_path / ".checkpoint_last.old-1234abcd").mkdir()
    (tmp_path / ".checkpoint_last.old-1234abcd" / "state.json").write_text("{}")
    (tmp_path / ".checkpoint_last.x9y8").mkdir()  # the copy being renamed in
    (tmp_path / ".summary.json.1a2b.tmp").write_text("{")
    remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last"]
    assert (tmp_path / "checkpoint_last" / "state.json").is_file()


def test_resume_without_checkpoint_last(tmp_path: Path) -> None:
    """Killed while the first checkpoint was being saved (rows ran past it): start again
    at 0. With checkpoint_best there, checkpoint_last was removed: refuse."""
    from rlft_ray.run.driver import RunError, prepare_run_dir
    from rlft_ray.run.metrics import METRICS_FILE

    cfg = build_config(CARTPOLE, ["checkpoint_every=5"])
    (tmp_path / "config.yaml").write_text("algo: ppo\n")
    rows = [{"counters/iteration": float(i)} for i in range(1, 6)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_run_dir(cfg, None, tmp_path, resume=True)
    assert read_metrics(tmp_path) == []
    (tmp_path / "checkpoint_best").mkdir()
    with pytest.raises(RunError, match="checkpoint_last is gone although the run saved"):
        prepare_run_dir(cfg, None, tmp_path, resume=True)


def test_resuming_an_init_from_run_keeps_its_reference(tmp_path: Path) -> None:
    """The KL reference of an ``init_from`` run is the ``init_from`` policy, also after a
    resume (not ``lm.model``); optimizer, RNG and counters come from the checkpoint."""
    from rlft_ray.learners.base import LearnerContext
    from rlft_ray.learners.checkpoint import Counters, save_checkpoint
    from rlft_ray.run.restore import restore

    cfg = build_config(CARTPOLE, [f"init_from={tmp_path / 'start'}"])

    class Spaces:
        def signature(self) -> dict[str, str]:
            return {}

    class Stub:
        def __init__(self) -> None:
            self.cfg, self.ctx, self.start_points = cfg, LearnerContext(), []
            self.policy = torch.nn.Linear(2, 2)
            self.optimizer = torch.optim.Adam(self.policy.parameters())

        def modules(self) -> dict[str, torch.nn.Module]:
            return {"policy": self.policy}

        def load_start_point(self, path: Path) -> None:
            self.start_points.append(path)

    saved = Stub()
    torch.nn.init.constant_(saved.policy.weight, 0.5)
    save_checkpoint(
        tmp_path / "last", saved.modules(), saved.optimizer, Counters(iteration=7), cfg, {}
    )
    learner = Stub()
    counters = restore(
        learner, cfg, Spaces(), resume_from=Checkpoint.from_directory(str(tmp_path / "last"))
    )
    assert learner.start_points == [tmp_path / "start"] and counters.iteration == 7
    assert torch.equal(learner.policy.weight, saved.policy.weight)


def test_tensorboard_never_fails_a_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "tensorboard").write_text("a file where the directory should be")
    callback = RunDirCallback(str(tmp_path), "reward/mean", tensorboard="algo: ppo\n")
    for i in (1, 2):
        callback.after_report(None, [{"counters/iteration": float(i)}], None)
    assert _iterations(tmp_path) == [1, 2]  # metrics.jsonl still written
    assert caplog.text.count("TensorBoard logging stopped") == 1
    off = tmp_path / "off"
    off.mkdir()
    RunDirCallback(str(off), "reward/mean").after_report(None, [{"counters/iteration": 1.0}], None)
    assert not (off / "tensorboard").exists()


# -- bad input: every verb fails fast, non-zero, naming the cause, leaving nothing ---------


def test_bad_input_sweep_over_every_verb(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "missing.jsonl"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"run_config: {CARTPOLE}\nsearch_space:\n  ppo.nope: {{grid: [1]}}\n")
    lm_missing = [str(GRPO), f"lm.model={model_dir}", f"lm.prompts={missing}"]
    cases = [
        (["train", str(CARTPOLE), "ppo.nope=1", "--output-dir", str(out)], "ppo.nope"),
        (["train", str(CARTPOLE), "--output-dir", str(out), "ppo.nope=1"], "ppo.nope"),
        (["train", *lm_missing, "--output-dir", str(out)], "prompt file not found"),
        (["train", str(CARTPOLE), "--resume", "--output-dir", str(out)], "holds no run to resume"),
        (["eval", str(tmp_path / "nothing")], "checkpoint not found"),
        (["tune", str(spec), "--output-dir", str(out)], "ppo.nope"),
        (["quickstart", "--output-dir", str(out), "grpo.nope=1"], "grpo.nope"),
        (["sample", *lm_missing, "--output-dir", str(out)], "prompt file not found"),
        (["make-arith-data", str(out), "--train", "0"], "--train"),
        (["make-arith-prefs", str(out), "--from", str(tmp_path / "no_model")], "no_model"),
    ]
    for argv, cause in cases:
        started = time.monotonic()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0, argv
        assert cause in err, (argv, err)
        assert time.monotonic() - started < 30, argv
        assert not out.exists(), argv
