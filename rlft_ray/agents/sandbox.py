"""The sandboxed Python tool: model-written code in a separate, resource-limited process.

:func:`run_python` runs the code in a fresh ``python -I -S`` subprocess (never the
actor's own interpreter), with

* CPU time bounded by ``RLIMIT_CPU`` (the kernel sends SIGXCPU, then SIGKILL),
* address space bounded by ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``),
* written file size bounded by ``RLIMIT_FSIZE`` and open files by ``RLIMIT_NOFILE``,
* a wall-clock timeout after which its whole process group is killed (a ``sleep`` or a
  blocked read uses no CPU time, so the CPU limit alone would not end it),
* a fresh temporary working directory, removed afterwards,
* an environment scrubbed to ``PATH`` and ``LANG``, isolated mode (``-I``: no
  ``PYTHON*`` variables, no user site-packages, the working directory not on the path),
  no ``site`` (``-S``), and the ``socket`` module blocked before the code runs.

Limits, honestly: without Linux namespaces, seccomp or a container this is a
resource fence, not a security boundary. "No network" is best effort: code that
re-imports the C extension ``_socket`` under another name, or runs ``os.system`` /
``subprocess`` with a network tool, can still reach the network, and the code can read
any file the actor's user can read. Run untrusted models' code in a container
(``docker run --network none``) or under ``nsjail`` / ``bwrap`` when that matters.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Prepended to the code: block the socket modules (best effort, see the module docstring).
_PRELUDE = (
    "import sys as _s\n"
    "for _m in ('socket', '_socket', 'ssl', 'urllib.request', 'http.client'):\n"
    "    _s.modules[_m] = None\n"
    "del _s, _m\n"
)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    Attributes:
        cpu_s: CPU seconds (``RLIMIT_CPU``).
        memory_mb: Address space in MiB (``RLIMIT_AS``); the interpreter itself needs
            about 30 MiB.
        wall_s: Wall-clock seconds before the process group is killed.
        max_output_chars: stdout + stderr kept (the rest is cut).
        file_mb: Largest file the code may write (``RLIMIT_FSIZE``).
    """

    cpu_s: int = 2
    memory_mb: int = 256
    wall_s: float = 5.0
    max_output_chars: int = 200
    file_mb: int = 1


@dataclass(frozen=True)
class SandboxResult:
    """One run's outcome.

    Attributes:
        ok: Exited with status 0 within the limits.
        output: stdout then stderr (trimmed to ``max_output_chars``); on failure, the
            reason first (``"timeout: ..."``).
        reason: None, or ``timeout`` / ``cpu_limit`` / ``memory_limit`` / ``error``.
        returncode: The exit status (negative: killed by that signal).
        seconds: Wall time.
    """

    ok: bool
    output: str
    reason: str | None
    returncode: int | None
    seconds: float


def _limit(limits: SandboxLimits) -> None:
    """In the child before exec: the resource limits, and a process group of its own."""
    mem = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * 1024 * 1024,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` in a sandboxed subprocess (see the module docstring for what that means).

    Never raises for anything the code does: a crash, a limit or the timeout is a
    :class:`SandboxResult` with ``ok=False`` and the reason.
    """
    limits = limits or SandboxLimits()
    start = time.perf_counter()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="rlft_sandbox_") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PRELUDE + code],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: _limit(limits),
            start_new_session=True,  # its own process group: the kill takes its children too
        )
        try:
            out, err = proc.communicate(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
    seconds = time.perf_counter() - start
    text = (out.decode(errors="replace") + err.decode(errors="replace")).strip()
    code_ = proc.returncode
    if timed_out:
        reason, head = "timeout", f"timeout: killed after {limits.wall_s:g} s"
    elif code_ in (-signal.SIGXCPU, -signal.SIGKILL):
        reason, head = "cpu_limit", f"cpu_limit: over {limits.cpu_s} s of CPU time"
    elif "MemoryError" in text:
        reason, head = "memory_limit", f"memory_limit: over {limits.memory_mb} MiB"
    elif code_ != 0:
        reason, head = "error", f"error: exit status {code_}"
    else:
        reason, head = None, ""
    if reason is not None:
        last = text.splitlines()[-1] if text else ""
        text = f"{head}" + (f"; {last}" if last and reason == "error" else "")
    return SandboxResult(
        ok=reason is None,
        output=text[: limits.max_output_chars],
        reason=reason,
        returncode=code_,
        seconds=seconds,
    )
