"""The RLHF pipeline on the arithmetic task, as the README runs it: reward model, then RL
against it with the shipped examples (GRPO and token-level PPO).

From an SFT base (``--base``, ``runs/q/sft_base`` from a fresh ``rlft-ray quickstart
--output-dir runs/q``) and the folder holding its prompts (``--data``, with
``arith_train.jsonl`` / ``arith_test.jsonl``):

1. ``rlft-ray make-arith-prefs`` labels the base's own samples with the verifier (the
   stand-in for human feedback): ``rm_prefs_{train,test}.jsonl``, held-out pairs from
   prompts training never sees.
2. ``examples/arithmetic_rm.yaml`` as shipped, per seed: held-out pairwise accuracy of
   ``checkpoint_best`` (chosen by that accuracy) and of the last evaluation.
3. ``examples/arithmetic_rlhf.yaml`` (GRPO) and ``examples/arithmetic_rlhf_ppo.yaml`` (PPO)
   as shipped, each against the same seed's reward model: the policy never sees the
   verifier; ``rlft-ray eval`` measures the true held-out exact-match of the base, of
   ``checkpoint_last`` and of ``checkpoint_best``, and the curve of ``eval/accuracy`` /
   ``eval/reward_model_auc`` gives the drop from the peak evaluation to the last one.
4. With ``--defences``: the GRPO recipe on the first seed with each optional defence on its
   own: a 3-member ensemble (the seeds' reward models, mean - 1 std), ``lm.reward_clip``,
   and ``stop_on_overoptimization=3``.

Targets (issue 28, medians over seeds): reward model >= 90 % held-out pairwise accuracy;
true accuracy of checkpoint_last and checkpoint_best >= base + 15 points; peak eval minus
final eval <= 5 points. Every step's JSON line carries its wall seconds (``command_wall_s``,
``eval_*_wall_s``); the summary line gives the medians, ``targets_met`` (each target on the
medians) and ``total_wall_s``.

Usage: python benchmarks/bench_rlhf.py --base runs/q/sft_base --data data [--seeds 0 1 2]
       [--defences]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, base_data_seeds, emit, run_cli, train_cli

RL_EXAMPLES = {"grpo": "examples/arithmetic_rlhf.yaml", "ppo": "examples/arithmetic_rlhf_ppo.yaml"}


def heldout_accuracy(model: str, data: Path) -> float:
    """Exact-match of ``model`` (a checkpoint or a model dir) on ``data/arith_test.jsonl``."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlft_ray", "eval", model, "--dataset", str(data / "arith_test.jsonl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    return float(json.loads(proc.stdout)["accuracy"])


def timed_accuracy(model: str, data: Path) -> tuple[float, float]:
    """:func:`heldout_accuracy` and the wall seconds of its ``rlft-ray eval`` command."""
    start = time.perf_counter()
    accuracy = heldout_accuracy(model, data)
    return accuracy, round(time.perf_counter() - start, 1)


def _rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").open()]


def reward_model(base: str, data: Path, seed: int) -> dict[str, Any]:
    """``examples/arithmetic_rm.yaml`` as shipped (only the base, the pair files and the seed set)."""
    summary = train_cli(
        "examples/arithmetic_rm.yaml",
        [
            f"lm.model={base}",
            f"lm.pairs={data / 'rm_prefs_train.jsonl'}",
            f"lm.eval_pairs={data / 'rm_prefs_test.jsonl'}",
            f"seed={seed}",
        ],
        tries=3,
    )
    evals = [r["eval/pairwise_accuracy"] for r in _rows(summary) if "eval/pairwise_accuracy" in r]
    return {
        "stage": "reward_model",
        "seed": seed,
        "heldout_pairwise_accuracy_best": round(summary["checkpoint_best_score"]["value"], 4),
        "best_iteration": summary["checkpoint_best_score"]["iteration"],
        "heldout_pairwise_accuracy_last": round(evals[-1], 4),
        "pairs": summary["pairs/kept"],
        "command_wall_s": summary["command_wall_s"],
        "output_dir": summary["output_dir"],
        "checkpoint": summary["checkpoint_best"],
    }


def rlhf(
    algo: str,
    base: str,
    data: Path,
    seed: int,
    rm: str | list[str],
    base_accuracy: float,
    extra: tuple[str, ...] = (),
    name: str | None = None,
) -> dict[str, Any]:
    """One RL run of the shipped example against ``rm``; true accuracies measured by the verifier."""
    rm_value = rm if isinstance(rm, str) else "[" + ",".join(rm) + "]"
    summary = train_cli(
        RL_EXAMPLES[algo],
        [
            f"lm.model={base}",
            f"lm.prompts={data / 'arith_train.jsonl'}",
            f"lm.eval_prompts={data / 'arith_test.jsonl'}",
            f"lm.reward_model={rm_value}",
            f"seed={seed}",
            *extra,
        ],
        tries=3,
    )
    curve = [
        (int(r["counters/iteration"]), r["eval/accuracy"], r.get("eval/reward_model_auc"))
        for r in _rows(summary)
        if "eval/accuracy" in r
    ]
    last, last_eval_s = timed_accuracy(summary["checkpoint_last"], data)
    best, best_eval_s = timed_accuracy(summary["checkpoint_best"], data)
    peak = max(a for _, a, _ in curve)
    return {
        "stage": name or f"rlhf_{algo}",
        "seed": seed,
        "overrides": list(extra),
        "base_accuracy": round(base_accuracy, 4),
        "last_accuracy": round(last, 4),
        "best_accuracy": round(best, 4),
        "last_gain_points": round(100 * (last - base_accuracy), 1),
        "best_gain_points": round(100 * (best - base_accuracy), 1),
        "peak_eval_accuracy": round(peak, 4),
        "peak_to_end_drop_points": round(100 * (peak - curve[-1][1]), 1),
        "iterations": summary["iterations"],
        "early_stop": summary.get("early_stop"),
        "curve": [(i, round(a, 3), None if u is None else round(u, 3)) for i, a, u in curve],
        "command_wall_s": summary["command_wall_s"],
        "eval_last_wall_s": last_eval_s,
        "eval_best_wall_s": best_eval_s,
        "output_dir": summary["output_dir"],
    }


def targets(summary: dict[str, Any]) -> dict[str, bool]:
    """Each target of issue 28 on the medians: met (True) or missed (False)."""
    met = {"rm_accuracy_ge_90pct": summary["rm_accuracy_median"] >= 0.90}
    for a in RL_EXAMPLES:
        met[f"{a}_last_gain_ge_15"] = summary[f"{a}_last_gain_points_median"] >= 15
        met[f"{a}_best_gain_ge_15"] = summary[f"{a}_best_gain_points_median"] >= 15
        met[f"{a}_drop_le_5"] = summary[f"{a}_peak_to_end_drop_points_median"] <= 5
    return met


def main() -> None:
    start = time.perf_counter()
    defences = "--defences" in sys.argv  # the shared parser knows --base/--data/--seeds only
    if defences:
        sys.argv.remove("--defences")
    args = base_data_seeds(__doc__.splitlines()[0])
    data = args.data
    prefs_s = run_cli(
        "make-arith-prefs", str(data), "--from", args.base,
        "--samples", "16", "--pairs-per-prompt", "8", "--name", "rm_prefs",
    )  # fmt: skip
    emit({"stage": "make_arith_prefs", "command_wall_s": round(prefs_s, 1)})
    base_accuracy, base_eval_s = timed_accuracy(args.base, data)
    emit({"stage": "base", "heldout_accuracy": base_accuracy, "eval_wall_s": base_eval_s})
    rms, results = [], {algo: [] for algo in RL_EXAMPLES}
    for seed in args.seeds:
        row = reward_model(args.base, data, seed)
        emit(row)
        rms.append(row)
        for algo in RL_EXAMPLES:
            out = rlhf(algo, args.base, data, seed, row["checkpoint"], base_accuracy)
            emit(out)
            results[algo].append(out)
    summary: dict[str, Any] = {
        "summary": "rlhf",
        "seeds": args.seeds,
        "base_accuracy": base_accuracy,
        "rm_accuracy_median": statistics.median(r["heldout_pairwise_accuracy_best"] for r in rms),
    }
    for algo, runs in results.items():
        for key in ("last_gain_points", "best_gain_points", "peak_to_end_drop_points"):
            summary[f"{algo}_{key}_median"] = statistics.median(r[key] for r in runs)
    summary["targets"] = {"rm_accuracy": 0.90, "gain_points": 15, "peak_to_end_drop_points": 5}
    summary["targets_met"] = targets(summary)
    summary["total_wall_s"] = round(time.perf_counter() - start, 1)
    summary["met"] = all(summary["targets_met"].values())
    emit(summary)
    if defences:  # each optional defence on its own, GRPO recipe, first seed
        seed, rm = args.seeds[0], rms[0]["checkpoint"]
        runs = [
            ("clip", rm, ("lm.reward_clip=2.0",)),
            ("early_stop", rm, ("stop_on_overoptimization=3",)),
        ]
        if len(rms) >= 3:
            members = [r["checkpoint"] for r in rms[:3]]
            runs.insert(0, ("ensemble", members, ("lm.reward_ensemble_std_coef=1.0",)))
        for name, model, extra in runs:
            emit(
                rlhf("grpo", args.base, data, seed, model, base_accuracy, extra, f"defence_{name}")
            )


if __name__ == "__main__":
    main()
