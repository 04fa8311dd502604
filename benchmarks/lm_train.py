"""Per-iteration costs of an LM RL run: weight sync share, learner and generation tokens/s, KL.

Builds the quickstart's SFT base (or takes ``--model``), runs ``rlft-ray train
examples/arithmetic_grpo.yaml`` for ``--iterations`` at two batch sizes (the quickstart's
16 prompts x 8 samples, and 64 x 8), and reads ``metrics.jsonl``:

* one JSON line per iteration: ``kl/mean`` (k3 to the frozen reference), reward;
* a summary per batch size: median ``perf/weight_sync_s`` as % of ``perf/iteration_s``
  (target < 5 %), learner tokens/s, generation tokens/s, iteration time.

Usage: python benchmarks/lm_train.py [--iterations 100] [--model DIR] [--quiet-iterations]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _common import emit, train_cli


def sft_base(directory: Path) -> Path:
    from envs.arithmetic import write_splits
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.lm.loading import load_model_and_tokenizer
    from rlft_ray.lm.sft import supervised_finetune
    from rlft_ray.lm.tiny import make_tiny_model

    quiet_transformers()
    train, _ = write_splits(directory / "data", 400, 10, seed=0)
    demos = [json.loads(line) for line in train.read_text().splitlines()[:300]]
    model, tok = load_model_and_tokenizer(make_tiny_model(directory / "init", max_positions=64))
    supervised_finetune(model, tok, demos, seconds=120, max_steps=1000)
    model.save_pretrained(directory / "sft")
    tok.save_pretrained(directory / "sft")
    return directory / "sft"


def main() -> None:
    # A fresh local Ray per run, even if someone else's `ray start` cluster is up on this machine.
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--model", default=None)
    p.add_argument("--quiet-iterations", action="store_true", help="only the summary lines")
    args = p.parse_args()
    model = args.model or str(sft_base(Path(tempfile.mkdtemp(prefix="rlft_bench_"))))
    for prompts in (16, 64):
        summary = train_cli(
            "examples/arithmetic_grpo.yaml",
            [
                f"model={model}",
                f"total_iterations={args.iterations}",
                f"lm.prompts_per_iteration={prompts}",
                "checkpoint_every=1000",
                "lm.track_kl_every=1",  # the KL line of every iteration
            ],
        )
        rows = [
            json.loads(line)
            for line in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        if not args.quiet_iterations:
            for r in rows:
                emit(
                    {
                        "benchmark": "lm_train_iteration",
                        "prompts_per_iteration": prompts,
                        "iteration": int(r["counters/iteration"]),
                        "kl_mean": round(r["kl/mean"], 5),
                        "kl_seq_mean": round(r["kl/seq_mean"], 5),
                        "reward_mean": round(r["reward/mean"], 4),
                    }
                )
        steady = rows[len(rows) // 5 :]  # skip warm-up iterations

        def med(key: str, rows=steady) -> float:
            return statistics.median(r[key] for r in rows)

        emit(
            {
                "benchmark": "lm_train",
                "prompts_per_iteration": prompts,
                "completions_per_iteration": prompts * 8,
                "iterations": len(rows),
                "iteration_s_median": round(med("perf/iteration_s"), 4),
                "weight_sync_s_median": round(med("perf/weight_sync_s"), 5),
                "weight_sync_pct_median": round(100 * med("perf/weight_sync_frac"), 2),
                "weight_sync_target_pct": 5,
                "weight_sync_met": 100 * med("perf/weight_sync_frac") < 5,
                "learner_tokens_per_s_median": round(med("perf/learner_tokens_per_s")),
                "generation_tokens_per_s_median": round(med("perf/tokens_per_s")),
                "kl_mean_first": round(rows[0]["kl/mean"], 5),
                "kl_mean_last": round(rows[-1]["kl/mean"], 5),
                "reward_mean_first10": round(
                    statistics.mean(r["reward/mean"] for r in rows[:10]), 4
                ),
                "reward_mean_last10": round(
                    statistics.mean(r["reward/mean"] for r in rows[-10:]), 4
                ),
                "run_wall_s": summary["wall_s"],
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )


if __name__ == "__main__":
    main()
