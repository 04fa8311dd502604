"""Ray Tune targets on CartPole PPO: a 4-trial ASHA search finishes in <= 3 min on
2 cores and stops >= 1 trial early; a 4-trial PBT search exploits >= 1 time.

Each search runs as ``rlft-ray tune <spec>`` in a fresh process (wall time counts
from the command's start, Ray start-up included) with the specs in ``tuning/``.

Usage: python benchmarks/bench_tune.py [--search asha pbt]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT, emit, run_cli

SPECS = {
    "asha": "tuning/cartpole_ppo_asha.yaml",
    "pbt": "tuning/cartpole_ppo_pbt.yaml",
}


def tune_cli(spec: str) -> dict[str, Any]:
    """Run ``rlft-ray tune`` in a fresh process; returns the results and the wall time."""
    out = Path(tempfile.mkdtemp(prefix="rlft_bench_tune_")) / "search"
    wall = run_cli("tune", str(ROOT / spec), "--output-dir", str(out), "--quiet")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    pbt_log = out / "tune" / "pbt_global.txt"
    return {
        "wall_s": round(wall, 1),
        "rows": rows,
        "best": json.loads((out / "best.json").read_text()),
        "exploits": len(pbt_log.read_text().splitlines()) if pbt_log.is_file() else 0,
        "restarts": sum(len(list(d.glob("run*"))) - 1 for d in (out / "trials").iterdir()),
        "output_dir": str(out),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--search", choices=sorted(SPECS), nargs="+", default=["asha", "pbt"])
    args = p.parse_args()
    for name in args.search:
        r = tune_cli(SPECS[name])
        status = [row["status"] for row in r["rows"]]
        record: dict[str, Any] = {
            "bench": f"tune_{name}_cartpole_ppo",
            "spec": SPECS[name],
            "trials": len(r["rows"]),
            "wall_s": r["wall_s"],
            "terminated": status.count("TERMINATED"),
            "stopped_early": status.count("STOPPED"),
            "errors": status.count("ERROR"),
            "iterations": [int(row["iterations"]) for row in r["rows"]],
            "best_metric": r["best"].get("value"),
            "best_config": r["best"].get("config"),
            "output_dir": r["output_dir"],
        }
        if name == "asha":
            record.update(target_wall_s=180, ok=r["wall_s"] <= 180 and record["stopped_early"] >= 1)
        else:
            record.update(
                exploits=r["exploits"], trial_restarts=r["restarts"], ok=r["exploits"] >= 1
            )
        emit(record)


if __name__ == "__main__":
    main()
