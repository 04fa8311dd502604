"""Shared helpers for the benchmark scripts (each prints JSON lines on stdout)."""

from __future__ import annotations

import argparse
import json
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


def train_cli(config: str, overrides: list[str], output_dir: Path | None = None) -> dict[str, Any]:
    """Run ``rlft-ray train`` in a fresh process; wall time counts from the command's start."""
    out = output_dir or Path(tempfile.mkdtemp(prefix="rlft_bench_")) / "run"
    wall = run_cli(
        "train", str(ROOT / config), *overrides, "--output-dir", str(out), "--no-progress"
    )
    summary = json.loads((out / "summary.json").read_text())
    summary["command_wall_s"] = round(wall, 2)
    summary["output_dir"] = str(out)
    return summary


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


def trl_grpo_config(out: str, seed: int, steps: int, **settings: Any) -> Any:
    """TRL's ``GRPOConfig`` for a side-by-side run on the CPU: one update per batch, PPO clip
    0.2, group-normalised advantages, sequence-mean-token-mean loss, a constant learning
    rate, grad norm 1, full sampling (T 1, no top-k / top-p), no dropout, nothing saved;
    ``settings`` gives the batch, lengths, beta and learning rate of the comparison."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out,
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
