"""RSFT from the quickstart's SFT base, with GRPO for the same wall time, side by side.

Target: rejection-sampling fine-tuning raises held-out exact-match by >= 25 points within
3 minutes on this 2-core machine. Per seed this runs ``rlft-ray quickstart --algo rsft``
(SFT base, then ``examples/arithmetic_rsft.yaml`` with held-out exact-match every round),
then GRPO (``examples/arithmetic_grpo.yaml``) from the same SFT base on the same prompts
for the same seconds of training (``time_limit_s`` = RSFT's training time), with held-out
exact-match every 25 iterations. Both curves (accuracy against training seconds) are
printed as JSON lines, with the time each first reached +25 points.

Usage: python benchmarks/lm_rsft.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from _common import emit, eval_curve, run_cli, train_cli


def first_reaching(points: list[tuple[float, float]], level: float) -> float | None:
    return next((t for t, acc in points if acc >= level), None)


def main() -> None:
    # A fresh local Ray per run, even if someone else's `ray start` cluster is up on this machine.
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix="rlft_rsft_")) / "q"
        wall = run_cli(
            "quickstart", "--algo", "rsft", "--output-dir", str(out), "--seed", str(seed)
        )
        s = json.loads((out / "summary.json").read_text())
        before, rsft = s["accuracy_before"], eval_curve(out)
        train_s = rsft[-1][0]
        grpo_run = train_cli(
            "examples/arithmetic_grpo.yaml",
            [
                f"model={out / 'sft_base'}",
                f"lm.prompts={out / 'data' / 'arith_train.jsonl'}",
                f"lm.eval_prompts={out / 'data' / 'arith_test.jsonl'}",
                f"seed={seed}",
                "eval_every=25",
                "total_iterations=100000",
                f"time_limit_s={train_s}",
            ],
        )
        grpo = eval_curve(Path(grpo_run["output_dir"]))
        result: dict[str, Any] = {
            "benchmark": "lm_rsft",
            "seed": seed,
            "accuracy_before": round(before, 4),
            "rsft_accuracy_after": round(s["accuracy_after"], 4),
            "rsft_gain_points": round(100 * (s["accuracy_after"] - before), 1),
            "rsft_best_points": round(100 * (max(a for _, a in rsft) - before), 1),
            "rsft_rl_s": s["rl_s"],
            "rsft_train_s": train_s,
            "rsft_rounds": s["iterations"],
            "rsft_s_to_plus25": first_reaching(rsft, before + 0.25),
            "grpo_accuracy_after": round(grpo[-1][1], 4) if grpo else None,
            "grpo_gain_points": round(100 * (grpo[-1][1] - before), 1) if grpo else None,
            "grpo_best_points": round(100 * (max(a for _, a in grpo) - before), 1)
            if grpo
            else None,
            "grpo_train_s": grpo[-1][0] if grpo else None,
            "grpo_iterations": grpo_run["iterations"],
            "grpo_s_to_plus25": first_reaching(grpo, before + 0.25),
            "quickstart_command_wall_s": round(wall, 2),
            "met": s["accuracy_after"] - before >= 0.25 and s["rl_s"] <= 180,
            "target_points": 25,
            "target_s": 180,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        emit(result)
        emit({"benchmark": "lm_rsft", "seed": seed, "algo": "rsft", "curve": rsft})
        emit({"benchmark": "lm_rsft", "seed": seed, "algo": "grpo", "curve": grpo})


if __name__ == "__main__":
    main()
