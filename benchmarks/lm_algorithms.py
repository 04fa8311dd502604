"""The GRPO family side by side: GRPO, DAPO, Dr. GRPO, GSPO, REINFORCE++ and RLOO with the same
budget from the same SFT base (issue 30).

Each method is its example file (``examples/arithmetic_{grpo,dapo,dr_grpo,gspo,reinforce_pp}.yaml``;
RLOO is the GRPO example with ``grpo.estimator=rloo``) on the quickstart's SFT base
(``--base``, default ``runs/q/sft_base``; made with ``rlft-ray quickstart --output-dir runs/q``
when missing), run for ``--seconds`` of training (``time_limit_s``) with held-out exact-match
every ``--eval-every`` iterations. Printed per method and seed: held-out accuracy against
training seconds, the samples generated, DAPO's dropped groups and extra samples, and pass@1 /
pass@8 / maj@8 (``rlft-ray eval --samples 8``) of the base and of each method's last checkpoint;
then each method's medians over seeds (iterations, seconds, samples, accuracy, pass@k, DAPO's
dropped groups). A run that fails prints an ``error`` line; the medians use the seeds that finished.

Usage: python benchmarks/lm_algorithms.py [--seeds 0 1 2] [--seconds 120] [--methods grpo dapo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import ROOT, emit, run_cli, train_cli

#: method -> (example file, extra overrides)
METHODS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("examples/arithmetic_grpo.yaml", []),
    "dapo": ("examples/arithmetic_dapo.yaml", []),
    "dr_grpo": ("examples/arithmetic_dr_grpo.yaml", []),
    "gspo": ("examples/arithmetic_gspo.yaml", []),
    "reinforce_pp": ("examples/arithmetic_reinforce_pp.yaml", []),
    "rloo": ("examples/arithmetic_grpo.yaml", ["grpo.estimator=rloo"]),
}


def sampled_eval(model: Path, data: Path, samples: int) -> dict[str, float]:
    """``rlft-ray eval MODEL --samples N`` on the held-out set: accuracy, pass@k, maj@k."""
    cmd = [sys.executable, "-m", "rlft_ray", "eval", str(model), "--dataset", str(data)]
    proc = subprocess.run(
        [*cmd, "--samples", str(samples)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout)
    keys = ("accuracy", "pass@1", f"pass@{samples}", f"maj@{samples}")
    return {k: round(result[k], 4) for k in keys}


def run(method: str, args: argparse.Namespace, seed: int) -> dict:
    config, extra = METHODS[method]
    summary = train_cli(
        config,
        [
            f"lm.model={args.base}",
            f"lm.prompts={args.data / 'arith_train.jsonl'}",
            f"lm.eval_prompts={args.data / 'arith_test.jsonl'}",
            *extra,
            f"seed={seed}",
            f"time_limit_s={args.seconds}",
            "total_iterations=100000",
            f"eval_every={args.eval_every}",
            "checkpoint_every=100000",
        ],
        tries=2,  # a Ray node that did not come up in 30 s under load: start once more
    )
    out = Path(summary["output_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    curve = [
        [round(r["time/wall_s"], 1), round(r["eval/accuracy"], 4)]
        for r in rows
        if "eval/accuracy" in r
    ]
    record = {
        "method": method,
        "seed": seed,
        "iterations": len(rows),
        "train_s": round(rows[-1]["time/wall_s"], 1),
        "samples": int(rows[-1]["counters/env_steps"]),
        "final_accuracy": curve[-1][1] if curve else None,
        "accuracy_vs_s": curve,
        "command_s": summary["command_wall_s"],
    }
    if "rollout/filtered_groups" in rows[-1]:
        record["filtered_groups"] = int(sum(r["rollout/filtered_groups"] for r in rows))
        record["extra_samples"] = int(sum(r["rollout/extra_samples"] for r in rows))
        record["resample_rounds_mean"] = round(
            statistics.mean(r["rollout/resample_rounds"] for r in rows), 2
        )
        # flat groups that reached an update (0: dynamic sampling spent none on them)
        record["trained_flat_group_frac"] = max(r["rollout/flat_group_frac"] for r in rows)
    after = sampled_eval(out / "checkpoint_last" / "policy", args.data / "arith_test.jsonl", 8)
    record.update({f"after_{k}": v for k, v in after.items()})
    return record


def main() -> None:
    os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh local Ray per run
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(ROOT / "runs" / "q" / "sft_base"))
    p.add_argument("--data", type=Path, default=ROOT / "data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds per run")
    p.add_argument("--eval-every", type=int, default=25, help="iterations between evaluations")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args()
    args.data = args.data.resolve()
    if not Path(args.base).is_dir():
        run_cli("quickstart", "--output-dir", str(Path(args.base).parent))
    before = sampled_eval(Path(args.base), args.data / "arith_test.jsonl", 8)
    emit({"benchmark": "lm_algorithms", "model": "sft_base", **before})
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            try:
                record = run(method, args, seed)
            except (RuntimeError, subprocess.CalledProcessError) as exc:  # one run, not all 18
                detail = getattr(exc, "stderr", None) or str(exc)
                error = {"method": method, "seed": seed, "error": detail[-1500:]}
                emit({"benchmark": "lm_algorithms", **error})
                continue
            results[method].append(record)
            emit({"benchmark": "lm_algorithms", **record, "load_avg_1m": os.getloadavg()[0]})
    for method, records in results.items():
        emit(summarise(method, records, args, before))


def summarise(method: str, records: list[dict], args: argparse.Namespace, before: dict) -> dict:
    """One method's medians over the seeds that finished (``seeds`` lists them)."""
    keys = ["iterations", "train_s", "samples", "final_accuracy"]
    keys += ["after_pass@1", "after_pass@8", "after_maj@8", "filtered_groups", "extra_samples"]
    out = {"benchmark": "lm_algorithms", "method": method, "seeds": [r["seed"] for r in records]}
    out["seconds"] = args.seconds
    for k in keys:
        values = [r[k] for r in records if r.get(k) is not None]
        if values:
            out[f"median_{k}"] = statistics.median(values)
    out["before_pass@1"], out["before_pass@8"] = before["pass@1"], before["pass@8"]
    return out


if __name__ == "__main__":
    main()
