"""TensorBoard logging overhead: CartPole PPO with and without ``tracking.tensorboard``.

Same settings and seed, alternating runs; compares the training loop's iterations/s
(iterations over ``time/wall_s`` of the last row). Target: within 3 %.

Usage: python benchmarks/bench_tracking.py [--repeats 3] [--steps 40960]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import emit, train_cli


def run(tensorboard: bool, steps: int, seed: int) -> float:
    """Iterations/s of the training loop in one run."""
    summary = train_cli(
        "examples/cartpole_ppo.yaml",
        [
            f"total_env_steps={steps}",
            "stop_return=null",
            f"seed={seed}",
            f"tracking.tensorboard={str(tensorboard).lower()}",
        ],
    )
    rows = (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    has_events = any((Path(summary["output_dir"]) / "tensorboard").glob("events.out.*"))
    assert has_events == tensorboard, "tracking.tensorboard did not decide the event files"
    return last["counters/iteration"] / last["time/wall_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40960)
    args = p.parse_args()
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for tensorboard in (False, True):
            rate = run(tensorboard, args.steps, seed=i)
            rates[tensorboard].append(rate)
            emit(
                {
                    "benchmark": "tracking",
                    "tensorboard": tensorboard,
                    "seed": i,
                    "iterations_per_s": round(rate, 2),
                }
            )
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    emit(
        {
            "benchmark": "tracking",
            "iterations_per_s_off": round(off, 2),
            "iterations_per_s_on": round(on, 2),
            "overhead": round(1 - on / off, 4),
            "target": 0.03,
            "met": 1 - on / off <= 0.03,
        }
    )


if __name__ == "__main__":
    main()
