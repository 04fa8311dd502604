"""Rejection sampling: the acceptance rule's statistics, and 1 -> 2 generation actors.

1. On a toy discrete proposal q and target p (6 outcomes, M = max p/q = 6), accepted
   samples of a(c) = min(1, p(c) / (M q(c))) must pass a chi-square goodness-of-fit test
   against p at alpha = 0.01 and accept at 1/M; the rule without M (min(1, p/q)) must fail.
2. ``rlft-ray sample`` (best-of-N through a Ray Data actor pool) from the quickstart's SFT
   base with 1 and with 2 generation actors, 1 CPU each, alternating: accepted samples/s
   after the first batch (the actors' start-up, model load, is reported apart) and over
   the whole sampling. Target: >= 1.7x with 2 actors. The generation actors hold one
   CPU each and use only it (torch and tokenizer threads, ``utils.hold_threads``).

Usage: python benchmarks/bench_rejection.py [--repeats 2] [--prompts 4000] [--base DIR --data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from _common import emit, run_cli

from rlft_ray.algorithms.selection import accept_mask, chi_square_test, ratio_log_acceptance

Q = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.10, 0.05], dtype=torch.float64)
P = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.20, 0.30], dtype=torch.float64)


def chi_square(rule: str, n: int = 60_000, seed: int = 0) -> dict[str, float | str | bool]:
    """Sample n outcomes from Q, accept by ``rule``, test the accepted histogram against P."""
    gen = torch.Generator().manual_seed(seed)
    log_m = float((P / Q).log().max()) if rule == "min(1, p/(M q))" else 0.0
    c = torch.multinomial(Q, n, replacement=True, generator=gen)
    log_a, _ = ratio_log_acceptance(P.log()[c], Q.log()[c], log_m)
    keep = accept_mask(log_a, gen)
    stat, p_value = chi_square_test(torch.bincount(c[keep], minlength=6).double(), P)
    return {
        "rule": rule,
        "chi2": round(stat, 2),
        "p_value": p_value,
        "passes_at_0.01": p_value > 0.01,
        "accept_rate": round(float(keep.double().mean()), 4),
        "expected_accept_rate": round(1 / 6, 4),
    }


def sample_job(
    base: Path, data: Path, actors: int, prompts: int, per_batch: int
) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="rlft_bon_")) / "bon"
    train = out.parent / "prompts.jsonl"
    # the training prompts, repeated as needed: a long steady phase next to the start-up
    lines = (data / "arith_train.jsonl").read_text().splitlines(True)
    train.write_text("".join((lines * (prompts // len(lines) + 1))[:prompts]))
    run_cli(
        "sample",
        "examples/arithmetic_bon.yaml",
        f"model={base}",
        f"lm.prompts={train}",
        "lm.num_samples=16",
        f"resources.num_rollout_actors={actors}",
        "resources.cpus_per_rollout_actor=1",
        "--prompts-per-batch",
        str(per_batch),
        "--output-dir",
        str(out),
        "--no-progress",
    )
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    os.environ.setdefault("RAY_ADDRESS", "local")
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4000)
    p.add_argument("--base", type=Path, default=None, help="an SFT base (default: build one)")
    p.add_argument("--data", type=Path, default=None, help="folder of arith_train.jsonl")
    p.add_argument("--prompts-per-batch", type=int, default=256)  # the CLI's default
    args = p.parse_args()
    for rule in ("min(1, p/(M q))", "min(1, p/q) (no M)"):
        emit({"benchmark": "rejection_chi_square", **chi_square(rule)})

    base, data = args.base, args.data
    if base is None:  # the quickstart's SFT base, built the quickstart's way
        q = Path(tempfile.mkdtemp(prefix="rlft_base_")) / "q"
        run_cli("quickstart", "--output-dir", str(q), "total_iterations=1")
        base, data = q / "sft_base", q / "data"
    data = data or Path(__file__).resolve().parent.parent / "data"
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for actors in (1, 2):
            s = sample_job(base, data, actors, args.prompts, args.prompts_per_batch)
            runs[actors].append(s)
            emit(
                {
                    "benchmark": "rejection_sample_job",
                    "actors": actors,
                    "steady_accepted_per_s": round(s["steady_accepted_per_s"], 1),
                    "steady_samples_per_s": round(s["steady_samples_per_s"], 1),
                    "accepted_per_s": round(s["accepted_per_s"], 1),
                    "first_batch_s": round(s["first_batch_s"], 2),
                    "accept_rate": round(s["accept_rate"], 4),
                    "samples": s["samples"],
                }
            )

    def med(actors: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[actors])

    steady = med(2, "steady_accepted_per_s") / med(1, "steady_accepted_per_s")
    whole = med(2, "accepted_per_s") / med(1, "accepted_per_s")
    emit(
        {
            "benchmark": "rejection_sample_job",
            "speedup_2_over_1_steady": round(steady, 2),
            "speedup_2_over_1_with_startup": round(whole, 2),
            "target": 1.7,
            "met": steady >= 1.7,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
    )


if __name__ == "__main__":
    main()
