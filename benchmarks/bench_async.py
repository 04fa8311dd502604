"""Overlapped sampling (``async_rollouts``) against synchronous, on the quickstart's RL phase.

GRPO on the arithmetic task from an SFT base (``--base``, e.g. ``runs/q/sft_base`` from
``rlft-ray quickstart``), 2 generation actors + 1 learner, the example's settings (500
iterations of 16 prompts x 8 samples), the same seed for both modes, alternating.
Printed per run and as medians: iterations/s of the training loop, the time the learner
waited for samples, and held-out exact-match of the last checkpoint. Target (issue 12):
>= 1.6x iterations/s at equal accuracy within seed noise.

Usage: python benchmarks/bench_async.py --base runs/q/sft_base [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import ROOT, emit, train_cli


def run(base: str, seed: int, overlap: bool) -> dict:
    summary = train_cli(
        "examples/arithmetic_grpo.yaml",
        [
            f"lm.model={base}",
            f"seed={seed}",
            f"async_rollouts={str(overlap).lower()}",
            "eval_every=500",
        ],
    )
    rows = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").open()]
    return {
        "async_rollouts": overlap,
        "seed": seed,
        # over the loop's own clock: reports and checkpoints included
        "iterations_per_s": round(len(rows) / rows[-1]["time/wall_s"], 2),
        "sample_wait_s_median": round(statistics.median(r["perf/sample_s"] for r in rows), 4),
        "update_s_median": round(statistics.median(r["perf/update_s"] for r in rows), 4),
        "policy_lag_mean": round(statistics.mean(r["rollout/policy_lag"] for r in rows), 3),
        "eval_accuracy": rows[-1].get("eval/accuracy"),
        "command_s": summary["command_wall_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default=str(ROOT / "runs" / "q" / "sft_base"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    results: dict[bool, list[dict]] = {False: [], True: []}
    for seed in args.seeds:
        for overlap in (False, True):
            r = run(args.base, seed, overlap)
            results[overlap].append(r)
            emit({"benchmark": "async_rollouts", **r})
    med = {
        k: {
            m: round(statistics.median(r[m] for r in rs), 3)
            for m in ("iterations_per_s", "eval_accuracy")
        }
        for k, rs in results.items()
    }
    emit(
        {
            "benchmark": "async_rollouts",
            "seeds": args.seeds,
            "sync_iterations_per_s": med[False]["iterations_per_s"],
            "async_iterations_per_s": med[True]["iterations_per_s"],
            "speedup": round(med[True]["iterations_per_s"] / med[False]["iterations_per_s"], 2),
            "sync_eval_accuracy": med[False]["eval_accuracy"],
            "async_eval_accuracy": med[True]["eval_accuracy"],
            "target_speedup": 1.6,
        }
    )


if __name__ == "__main__":
    main()
