"""Arithmetic exact-match before/after RL (target: >= +25 points within 3 min of RL, 2 cores).

Runs ``rlft-ray quickstart`` (tiny GPT-2, SFT on 300 solved problems, GRPO with an
exact-match verifier on 4000 prompts through generation actors + Ray Train) in a fresh
process per seed and reports greedy exact-match on 200 held-out problems before and
after RL. ``rl_s`` is the wall time of the whole RL stage (Ray start, actors, Ray Train,
500 iterations, checkpoints).

Usage: python benchmarks/lm_arith.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import emit, run_cli


def main() -> None:
    # A fresh local Ray per run, even if someone else's `ray start` cluster is up on this machine.
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("overrides", nargs="*", help="dotted overrides for the RL run")
    args = p.parse_args()
    gains = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix="rlft_bench_")) / "q"
        wall = run_cli("quickstart", "--output-dir", str(out), "--seed", str(seed), *args.overrides)
        s = json.loads((out / "summary.json").read_text())
        # accuracies are counts over the held-out problems: round away float noise
        # (0.58 - 0.33 is 24.999... points)
        gain = round(100 * (s["accuracy_after"] - s["accuracy_before"]), 6)
        gains.append(gain)
        emit(
            {
                "benchmark": "lm_arith",
                "seed": seed,
                "accuracy_before": round(s["accuracy_before"], 4),
                "accuracy_after": round(s["accuracy_after"], 4),
                "gain_points": round(gain, 1),
                "rl_s": s["rl_s"],
                "rl_iterations": s["iterations"],
                "sft_s": s["sft_s"],
                "quickstart_wall_s": s["wall_s"],
                "command_wall_s": round(wall, 2),
                # accuracies are counts over the test set: compare the rounded points (0.58 -
                # 0.33 is 24.999... in floating point)
                "met": round(gain, 1) >= 25 and s["rl_s"] <= 180,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "output_dir": str(out),
            }
        )
    emit(
        {
            "benchmark": "lm_arith",
            "seeds": args.seeds,
            "gain_points_mean": round(sum(gains) / len(gains), 1),
            "target_points": 25,
            "target_rl_s": 180,
        }
    )


if __name__ == "__main__":
    main()
