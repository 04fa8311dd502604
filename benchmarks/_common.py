"""Shared helpers for the benchmark scripts (each prints JSON lines on stdout)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def emit(record: dict[str, Any]) -> None:
    """Print one JSON line and flush (so partial results survive a timeout)."""
    print(json.dumps(record), flush=True)


class TreeMemory:
    """Peak memory of a process and all its descendants (a run's Ray workers, raylet and
    object store included), sampled on a thread every ``interval`` seconds.

    ``peak_pss_mb`` is the peak of the summed proportional set sizes: a page shared by
    several processes (the object store, a shared-memory weights file, libraries) is
    counted once in total, so it is what the whole run holds. ``peak_rss_mb`` sums
    resident sizes and counts a shared page once per process that maps it. Reading a
    5 GB process's PSS takes the kernel about 0.15 s: a sample every second would cost a
    run of six processes a quarter of a core, every 5 s costs 5 %.
    """

    def __init__(self, pid: int, interval: float = 5.0) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.peak_pss_mb = self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            pss = rss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                pss, rss = pss + info.pss, rss + info.rss
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 2**20)
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peaks in MB."""
        self._stop.set()
        self._thread.join(timeout=10)
        return {
            "peak_pss_mb": round(self.peak_pss_mb, 1),
            "peak_rss_sum_mb": round(self.peak_rss_mb, 1),
        }


def run_measured(cmd: list[str]) -> tuple[float, dict[str, float], str]:
    """Run ``cmd`` from the repo root, sampling its process tree's memory.

    Returns:
        Wall seconds, the :class:`TreeMemory` peaks, and its stdout.

    Raises:
        RuntimeError: The command failed (with the tail of its stderr).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    memory = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    peaks = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peaks, out


def run_cli(*args: str) -> float:
    """Run ``python -m rlft_ray *args`` in a fresh process from the repo root.

    Returns:
        Wall seconds from the command's start.

    Raises:
        RuntimeError: The command failed (with the tail of its stderr).
    """
    cmd = [sys.executable, "-m", "rlft_ray", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def train_cli(
    config: str, overrides: list[str], output_dir: Path | None = None, tries: int = 1
) -> dict[str, Any]:
    """Run ``rlft-ray train`` in a fresh process; wall time counts from the command's start.

    ``tries > 1`` retries a run whose Ray node did not come up within Ray's fixed 30 s (a
    machine overloaded by other jobs; the failed start leaves no run directory behind);
    any other failure raises at once.
    """
    out = output_dir or Path(tempfile.mkdtemp(prefix="rlft_bench_")) / "run"
    cmd = [sys.executable, "-m", "rlft_ray", "train", str(ROOT / config), *overrides]
    for attempt in range(tries):
        try:
            wall, memory, _ = run_measured([*cmd, "--output-dir", str(out), "--no-progress"])
            break
        except RuntimeError as exc:
            if "timed out during startup" not in str(exc) or attempt == tries - 1:
                raise
    summary = json.loads((out / "summary.json").read_text())
    summary["command_wall_s"] = round(wall, 2)
    summary["tree_memory"] = memory  # the whole run's peak, shared pages counted once
    summary["output_dir"] = str(out)
    return summary


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``, one dict per logged iteration."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def eval_curve(run_dir: Path, key: str = "eval/accuracy") -> list[tuple[float, float]]:
    """``(training seconds, key)`` at every iteration that logged ``key``."""
    return [(round(r["time/wall_s"], 2), r[key]) for r in read_metrics(run_dir) if key in r]


def last_mean(run_dir: Path, key: str, n: int = 5) -> float:
    """Mean of ``key`` over the last ``n`` iterations that logged it (0 if none did)."""
    values = [r[key] for r in read_metrics(run_dir) if key in r][-n:]
    return round(sum(values) / max(len(values), 1), 4)


def medians(records: list[dict[str, Any]], keys: tuple[str, ...], prefix: str = "") -> dict:
    """``{prefix + key: median over records}`` for every key (records of several seeds;
    a key only some records hold, from an older log, is the median of those, and one no
    record holds is left out)."""
    out = {}
    for k in keys:
        values = [r[k] for r in records if k in r]
        if values:
            out[f"{prefix}{k}"] = round(statistics.median(values), 4)
    return out


def base_data_seeds(description: str) -> argparse.Namespace:
    """``--base`` (an SFT base model), ``--data`` (its prompts, resolved) and ``--seeds``:
    the arguments of the benchmarks that start from the quickstart's SFT base."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--base", default=str(ROOT / "runs" / "q" / "sft_base"))
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    args.data = args.data.resolve()
    return args


# TRL 1.x's configs default to bf16 autocast and gradient checkpointing (``bf16=None`` becomes
# True, ``gradient_checkpointing=True``), even with ``use_cpu``; ours learns in float32 without
# checkpointing, so every side-by-side run turns both off. (On a CPU without bf16 instructions
# the autocast alone made TRL's GRPO step ~20x slower.)
TRL_AS_OURS: dict[str, bool] = {"bf16": False, "fp16": False, "gradient_checkpointing": False}


def trl_grpo_config(out: str, seed: int, steps: int, **settings: Any) -> Any:
    """TRL's ``GRPOConfig`` for a side-by-side run on the CPU: one update per batch, PPO clip
    0.2, group-normalised advantages, sequence-mean-token-mean loss, a constant learning
    rate, grad norm 1, full sampling (T 1, no top-k / top-p), no dropout, nothing saved;
    float32 without gradient checkpointing, as ours runs (``TRL_AS_OURS``);
    ``settings`` gives the batch, lengths, beta and learning rate of the comparison."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out,
        **TRL_AS_OURS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps,
        num_iterations=1,
        use_cpu=True,
        disable_dropout=True,
        save_strategy="no",
        report_to="none",
        seed=seed,
        **settings,
    )
