"""CartPole-v1 PPO side by side with the single-process peer, CleanRL's ``ppo.py``.

For each seed, alternating, both commands run in fresh processes on this machine:
``python benchmarks/cleanrl_ppo.py`` (CleanRL's script and defaults, reproduced) and
``rlft-ray train examples/cartpole_ppo.yaml stop_return=450``. Each stops once the mean
return of the last 20 episodes reaches 450. Printed per run and as medians: seconds from
the command's start to reaching 450 (``to_450_s``) and to the command's exit
(``command_s``), env steps, and for rlft_ray its start-up breakdown (``summary.json``'s
``startup``: imports, checks, Ray, actors, Train controller + workers + learner, the
iterations, teardown). Target (issue 12): ours <= CleanRL's, start-up to the first
iteration <= 5 s.

Usage: python benchmarks/vs_cleanrl.py [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, emit, train_cli


def cleanrl(seed: int) -> dict:
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cleanrl_ppo.py"), "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    end = time.time()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "who": "cleanrl",
        "seed": seed,
        "reached": out["reached"],
        "env_steps": out["env_steps"],
        "to_450_s": round(out["end_unix"] - start, 2),
        "command_s": round(end - start, 2),
    }


def ours(seed: int) -> dict:
    start = time.time()
    summary = train_cli("examples/cartpole_ppo.yaml", ["stop_return=450", f"seed={seed}"])
    out = Path(summary["output_dir"])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "who": "rlft_ray",
        "seed": seed,
        "reached": (summary["episode_return_mean"] or 0) >= 450,
        "env_steps": summary["env_steps"],
        "to_450_s": round(last["time/unix"] - start, 2),
        "command_s": summary["command_wall_s"],
        "startup": summary.get("startup"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"cleanrl": [], "rlft_ray": []}
    for seed in args.seeds:
        for fn in (cleanrl, ours):
            result = fn(seed)
            runs[result["who"]].append(result)
            emit({"benchmark": "vs_cleanrl", **result})
    for rs in runs.values():  # a run that never reached 450 has no time to it
        for r in rs:
            r["to_450_s"] = r["to_450_s"] if r["reached"] else float("inf")
    med = {
        who: {
            k: statistics.median(r[k] for r in rs) for k in ("to_450_s", "command_s", "env_steps")
        }
        for who, rs in runs.items()
    }
    startup = [
        r["startup"] for r in runs["rlft_ray"] if "train_start_s" in (r.get("startup") or {})
    ]
    emit(
        {
            "benchmark": "vs_cleanrl",
            "seeds": args.seeds,
            "cleanrl_to_450_s": med["cleanrl"]["to_450_s"],
            "rlft_ray_to_450_s": med["rlft_ray"]["to_450_s"],
            "ratio_to_450": round(med["rlft_ray"]["to_450_s"] / med["cleanrl"]["to_450_s"], 2),
            "cleanrl_command_s": med["cleanrl"]["command_s"],
            "rlft_ray_command_s": med["rlft_ray"]["command_s"],
            "cleanrl_env_steps": med["cleanrl"]["env_steps"],
            "rlft_ray_env_steps": med["rlft_ray"]["env_steps"],
            "rlft_ray_startup_median": {
                k: statistics.median(s[k] for s in startup) for k in startup[0]
            }
            if startup
            else None,
            "target": "rlft_ray_to_450_s <= cleanrl_to_450_s; to_first_iteration_s <= 5",
        }
    )


if __name__ == "__main__":
    main()
