"""Where a run's wall time goes before its first iteration and after its last (``summary.json``'s ``startup``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from rlft_ray.config import RunConfig


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


#: Whether this process exists for one run (the ``rlft-ray`` command): only then does the
#: start-up breakdown count from the process's start (imports included).
_COUNT_FROM_PROCESS_START = [False]


def count_from_process_start() -> None:
    """Called by the CLI: this process runs one command, so its start is the run's start."""
    _COUNT_FROM_PROCESS_START[0] = True


class StartupMarks:
    """Where a run's wall time goes outside its iterations: process start (imports) ->
    checks -> Ray -> actors -> the first iteration's start (Train controller, worker group,
    learner, restore, first weight sync) ... the last iteration's end -> training returned.
    The driver puts :meth:`breakdown` into ``summary.json`` as ``startup``."""

    #: What the command prints as each phase ends (start-up can take a minute on a real model).
    SAY = {
        "checks": "checked the config, model, tokenizer, data and reward",
        "ray_init": "Ray is up",
        "actors": "rollout actors started; the learner loads next",
    }

    def __init__(self, say: bool = False) -> None:
        self.say = say
        age = process_age_s() if _COUNT_FROM_PROCESS_START[0] else None
        now = time.time()
        self.process_start = now - age if age is not None else None
        self.points: list[tuple[str, float]] = [("imports", now)]

    def mark(self, name: str) -> None:
        """The phase ``name`` ends now (and the command says so, with its seconds)."""
        now = time.time()
        if self.say and name in self.SAY:
            took = now - self.points[-1][1]
            print(f"rlft-ray: {self.SAY[name]} ({took:.1f} s)", file=sys.stderr, flush=True)
        self.points.append((name, now))

    def breakdown(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Seconds per phase; ``to_first_iteration_s`` from process start (or from the
        driver's start where the process start is unknown)."""
        origin = self.process_start if self.process_start is not None else self.points[0][1]
        out: dict[str, float] = {}
        prev = origin
        for name, at in self.points:
            if name == "training":
                break
            out[f"{name}_s"] = round(at - prev, 3)
            prev = at
        mine = [r for r in rows if r.get("time/unix", 0.0) >= self.points[0][1]]
        end = dict(self.points).get("training")
        if mine and end is not None:
            first = mine[0]["time/unix"] - mine[0].get("perf/iteration_s", 0.0)
            out["train_start_s"] = round(first - prev, 3)  # controller, workers, learner
            out["iterations_s"] = round(mine[-1]["time/unix"] - first, 3)
            out["train_end_s"] = round(end - mine[-1]["time/unix"], 3)
            out["to_first_iteration_s"] = round(first - origin, 3)
        return out


def default_output_dir(stem: str) -> Path:
    """``runs/<stem>-<date>-<time>``: where a command writes when no ``--output-dir`` is given."""
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_early(
    own_process: bool, address: str | None = None, cfg: RunConfig | None = None
) -> None:
    """A command of its own (``own_process``): local Ray boots while the driver imports and
    checks the task, and the run's start-up breakdown counts from the process start
    (imports included). Called from a caller's process (``main([...])``): nothing."""
    if not own_process:
        return
    from rlft_ray.learners.registry import GENERATION_MODULE, rollout_module
    from rlft_ray.run.ray_session import start_ray_early

    preload = rollout_module(cfg) if cfg else GENERATION_MODULE  # LM quickstart: no cfg yet
    start_ray_early(address, cfg.resources if cfg else None, preload)
    count_from_process_start()
