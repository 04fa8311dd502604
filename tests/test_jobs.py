"""`ray job submit` end to end against a real local head node (`ray start --head`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    address: str  # the dashboard / job-submission address
    env: dict[str, str]  # environment for Ray CLI clients of this head
    token: str


def _kill_head(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop exactly the processes of this head (never `ray stop`, which stops every
    Ray instance of the user on this machine)."""
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Stragglers that left the process group: find them by this head's temp dir.
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_dir.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A head node on loopback with token authentication (the Ray >= 2.59 default for
    local clusters), in a temp dir, stopped afterwards."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = Path(tempfile.mkdtemp(prefix="rlft_head_", dir="/tmp"))  # short: socket paths
    gcs, dashboard, client, agent = _free_ports(4)
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        "ray", "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--temp-dir={temp_dir}/ray", "--num-cpus=2",
    ]  # fmt: skip
    log = open(temp_dir / "head.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dashboard}", env, token)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                _client(head).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"head did not come up:\n{(temp_dir / 'head.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield head
    finally:
        _kill_head(proc, temp_dir)
        log.close()


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def _readme_submit_line() -> list[str]:
    """The README's `ray job submit` line, as written."""
    (line,) = [
        ln
        for ln in (ROOT / "README.md").read_text().splitlines()
        if ln.startswith("ray job submit ")
    ]
    return line.split()


def test_the_readmes_job_submit_line_trains_and_writes_the_run_dir(
    ray_head: Head, tmp_path: Path
) -> None:
    """The README's line, word for word, with the head's token in the environment as the
    README's export line puts it; only the address, the output directory (absolute: a
    job runs in its own working_dir copy) and a short budget differ."""
    argv = _readme_submit_line()
    assert argv[:6] == [
        "ray",
        "job",
        "submit",
        "--address",
        "http://127.0.0.1:8265",
        "--working-dir",
    ]
    out = tmp_path / "run"
    argv[4] = ray_head.address
    argv[argv.index("--output-dir") + 1] = str(out)
    argv += ["total_env_steps=1024", "resources.num_rollout_actors=1", "--no-progress"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] == 1024 and summary["error"] is None
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    # The entrypoint's driver joined this head (RAY_ADDRESS set by the job supervisor)
    # rather than starting a Ray instance of its own: the head knows it as the job's driver.
    client = _client(ray_head)
    (job,) = [j for j in client.list_jobs() if str(out) in (j.entrypoint or "")]
    assert str(job.status) == "SUCCEEDED" and job.driver_info is not None


def test_job_with_bad_config_fails_with_the_config_error(ray_head: Head) -> None:
    # The documented CLI path: `ray job submit --working-dir . -- rlft-ray train ...`
    proc = subprocess.run(
        [
            "ray", "job", "submit", "--address", ray_head.address, "--working-dir", ".",
            "--", "rlft-ray", "train", "examples/cartpole_ppo.yaml", "ppo.lrr=3e-4",
        ],
        cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "ppo.lrr: unknown key; did you mean 'ppo.lr'?" in output
    client = _client(ray_head)
    (job,) = [j for j in client.list_jobs() if "ppo.lrr" in (j.entrypoint or "")]
    assert str(job.status) == "FAILED"
    assert "ppo.lrr: unknown key" in client.get_job_logs(job.submission_id)


def test_submit_without_a_head_says_it_cannot_connect(tmp_path: Path) -> None:
    (port,) = _free_ports(1)
    address = f"http://127.0.0.1:{port}"
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--", "rlft-ray", "train", "examples/cartpole_ppo.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert f"Failed to connect to Ray at address: {address}" in proc.stdout + proc.stderr
