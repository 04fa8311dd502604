"""The RLHF pipeline on the arithmetic task: reward model accuracy, then RL against it.

From an SFT base (``--base``, e.g. ``runs/q/sft_base`` from ``rlft-ray quickstart``) and the
folder holding its prompts (``--data``, with ``arith_train.jsonl`` / ``arith_test.jsonl``):

1. ``rlft-ray make-arith-prefs`` labels the base's own samples with the verifier (the
   stand-in for human feedback): ``rm_prefs_{train,test}.jsonl``, held-out pairs from
   prompts training never sees.
2. ``examples/arithmetic_rm.yaml`` per seed, with its SFT regulariser (``sft_coef`` 0.5:
   the mean-NLL term, in the spirit of GRM but not the paper's ``regularizer: grm``) and
   without it (plain Bradley-Terry): held-out pairwise accuracy of the last checkpoint
   (``rm_accuracy_median_grm`` in the summary names the regularised model).
3. ``examples/arithmetic_grpo.yaml`` with ``lm.reward_model`` (the regularised reward model of the
   same seed): the policy never sees the verifier; its held-out exact-match is measured by
   the verifier (``rlft-ray eval``) on the base and on the last checkpoint, plus the
   curve of ``eval/accuracy`` and ``eval/reward_model_auc`` every 25 iterations.

Targets (issue 10): reward model >= 90 % held-out pairwise accuracy; RL against it raises
true exact-match by >= 15 points.

Usage: python benchmarks/bench_rlhf.py --base runs/q/sft_base --data data [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import ROOT, base_data_seeds, emit, run_cli, train_cli


def heldout_accuracy(model: str, data: Path) -> float:
    """Exact-match of ``model`` (a checkpoint or a model dir) on ``data/arith_test.jsonl``."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlft_ray",
            "eval",
            model,
            "--dataset",
            str(data / "arith_test.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout)["accuracy"])


def reward_model(base: str, data: Path, seed: int, sft_coef: float) -> dict:
    summary = train_cli(
        "examples/arithmetic_rm.yaml",
        [
            f"lm.model={base}",
            f"lm.pairs={data / 'rm_prefs_train.jsonl'}",
            f"lm.eval_pairs={data / 'rm_prefs_test.jsonl'}",
            f"reward_model.sft_coef={sft_coef}",
            f"seed={seed}",
        ],
    )
    rows = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").open()]
    evals = [r["eval/pairwise_accuracy"] for r in rows if "eval/pairwise_accuracy" in r]
    return {
        "stage": "reward_model",
        "seed": seed,
        "sft_coef": sft_coef,
        "heldout_pairwise_accuracy": round(evals[-1], 4),  # the last checkpoint's
        "pairs": summary["pairs/kept"],
        "command_wall_s": summary["command_wall_s"],
        "checkpoint": summary["checkpoint_last"],
    }


def rlhf(base: str, data: Path, seed: int, rm: str, base_accuracy: float) -> dict:
    summary = train_cli(
        "examples/arithmetic_grpo.yaml",
        [
            f"lm.model={base}",
            f"lm.prompts={data / 'arith_train.jsonl'}",
            f"lm.eval_prompts={data / 'arith_test.jsonl'}",
            f"lm.reward_model={rm}",
            "eval_every=25",
            f"seed={seed}",
        ],
    )
    rows = [json.loads(x) for x in (Path(summary["output_dir"]) / "metrics.jsonl").open()]
    curve = [
        (int(r["counters/iteration"]), r["eval/accuracy"], r.get("eval/reward_model_auc"))
        for r in rows
        if "eval/accuracy" in r
    ]
    final = heldout_accuracy(summary["checkpoint_last"], data)
    return {
        "stage": "rlhf_grpo",
        "seed": seed,
        "base_accuracy": round(base_accuracy, 4),
        "final_accuracy": round(final, 4),
        "gain_points": round(100 * (final - base_accuracy), 1),
        "peak_eval_accuracy": round(max(a for _, a, _ in curve), 4),
        "curve": [(i, round(a, 3), None if u is None else round(u, 3)) for i, a, u in curve],
        "command_wall_s": summary["command_wall_s"],
    }


def main() -> None:
    args = base_data_seeds(__doc__.splitlines()[0])
    data = args.data
    run_cli(
        "make-arith-prefs", str(data), "--from", args.base,
        "--samples", "16", "--pairs-per-prompt", "8", "--name", "rm_prefs",
    )  # fmt: skip
    base_accuracy = heldout_accuracy(args.base, data)
    rms: dict[float, list[float]] = {0.0: [], 0.5: []}
    gains = []
    for seed in args.seeds:
        for coef in (0.0, 0.5):
            row = reward_model(args.base, data, seed, coef)
            emit(row)
            rms[coef].append(row["heldout_pairwise_accuracy"])
        row = rlhf(args.base, data, seed, row["checkpoint"], base_accuracy)
        emit(row)
        gains.append(row["gain_points"])
    emit(
        {
            "summary": "rlhf",
            "rm_accuracy_median_grm": statistics.median(rms[0.5]),
            "rm_accuracy_median_plain_bt": statistics.median(rms[0.0]),
            "rlhf_gain_points_median": statistics.median(gains),
            "targets": {"rm_accuracy": 0.90, "rlhf_gain_points": 15},
        }
    )


if __name__ == "__main__":
    main()
