"""Does a bf16 vLLM engine with truncated importance sampling learn as well as fp32?

``python benchmarks/bench_vllm.py --only tis [--seeds 0 1 2] [--tis-iterations 30]``:
the quickstart's recipe on a tiny Llama (vLLM's CPU attention has no kernel for the
quickstart GPT-2's head size 16): 2-digit additions, a random Llama (2 layers, hidden
64, head size 32) supervised-fine-tuned on 300 solved problems, then per seed
``examples/arithmetic_grpo.yaml`` with ``lm.backend=vllm`` twice, alternating: an fp32
run (engine and learner in fp32, no TIS) and a bf16 run (bf16 engine, bf16 learner
compute over fp32 master weights) with ``grpo.tis_cap=2.0``. One JSON line per run:
held-out exact-match accuracy halfway and at the end (``eval/accuracy``, the actors'
greedy decoding of the 200 test problems), the mean log-prob gap between engine and
learner, the TIS weights (last iteration); first a line with the SFT base's accuracy
(HF greedy decoding), last one line of medians over the seeds per arm. The runs keep the
example's ``async_rollouts: true`` (the gap then holds one update's change as well).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/arithmetic_grpo.yaml"
#: The two arms: (name, overrides).
ARMS = (
    ("fp32", ["lm.dtype=float32"]),
    ("bf16_tis2", ["lm.dtype=bfloat16", "grpo.tis_cap=2.0"]),
)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sft_llama_base(out: Path) -> tuple[Path, Path, Path]:
    """The quickstart's data and SFT base, as a Llama vLLM's CPU attention runs;
    returns (base, train prompts, test prompts)."""
    import torch

    from envs.arithmetic import write_splits
    from rlft_ray.apps.quickstart import QuickstartSettings, build_sft_base
    from rlft_ray.core.torch_utils import seed_everything

    settings = QuickstartSettings(arch="llama", n_head=2)  # hidden 64: head size 32
    seed_everything(settings.seed)
    torch.set_num_threads(1)  # as the quickstart: a tiny model runs fastest on one thread
    train, test = write_splits(out / "data", settings.n_train, settings.n_test, kind="add")
    demos = [json.loads(line) for line in train.read_text().splitlines()[: settings.n_demos]]
    build_sft_base(out, demos, settings, log=lambda *_: None)
    return out / "sft_base", train, test


def one_run(base: Path, train: Path, test: Path, out: Path, seed: int, arm: list[str], iters: int):
    """One GRPO run on the vLLM backend; returns its metrics rows."""
    from rlft_ray.config import build_config
    from rlft_ray.run.driver import run_training
    from rlft_ray.run.metrics import read_metrics

    cfg = build_config(
        ROOT / EXAMPLE,
        [
            f"lm.model={base}",
            f"lm.prompts={train}",
            f"lm.eval_prompts={test}",
            "lm.backend=vllm",
            f"seed={seed}",
            f"total_iterations={iters}",
            f"eval_every={max(1, iters // 2)}",
            "checkpoint_every=1000",
            *arm,
        ],
    )
    run_training(cfg, out, progress=False, track=False)
    return read_metrics(out)


def _mean_of(rows: list[dict], key: str, digits: int) -> float | None:
    """The mean of ``key`` over the metrics rows that report it (None: none does)."""
    values = [r[key] for r in rows if key in r]
    return round(statistics.mean(values), digits) if values else None


def _last_of(rows: list[dict], key: str, digits: int) -> float | None:
    """``key`` of the last metrics row that reports it (None: none does)."""
    values = [r[key] for r in rows if key in r]
    return round(values[-1], digits) if values else None


def tis_seeds(args: argparse.Namespace) -> None:
    """Per seed, the fp32 run and the bf16 + TIS run (alternating); medians per arm."""
    import ray

    from rlft_ray.config import build_config
    from rlft_ray.rollout.evaluate import evaluate_model

    ray.init(address="local", num_cpus=2, logging_level="ERROR")
    finals: dict[str, list[float]] = {name: [] for name, _ in ARMS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            base, train, test = sft_llama_base(Path(tmp) / "base")
            before = evaluate_model(base, test, build_config(ROOT / EXAMPLE).lm)
            emit({"bench": "vllm_tis", "arm": "sft_base", "eval_accuracy": before["accuracy"]})
            for seed in args.seeds:
                arms = ARMS if seed % 2 == 0 else ARMS[::-1]
                for name, arm in arms:
                    out = Path(tmp) / f"{name}-{seed}"
                    rows = one_run(base, train, test, out, seed, arm, args.tis_iterations)
                    evals = [r for r in rows if "eval/accuracy" in r]
                    finals[name].append(evals[-1]["eval/accuracy"])
                    emit(
                        {
                            "bench": "vllm_tis",
                            "arm": name,
                            "seed": seed,
                            "iterations": len(rows),
                            "eval_accuracy_mid": round(evals[0]["eval/accuracy"], 4),
                            "eval_accuracy_last": round(evals[-1]["eval/accuracy"], 4),
                            "reward_mean_last5": round(
                                statistics.mean(r["reward/mean"] for r in rows[-5:]), 4
                            ),
                            # over the iterations that trained a row (the others compare
                            # none; None: no iteration did)
                            "logprob_gap_mean": _mean_of(rows, "rollout/logprob_gap", 5),
                            "tis_mean": _last_of(rows, "rollout/tis_mean", 4),
                            "tis_clipped_frac": _last_of(rows, "rollout/tis_clipped_frac", 5),
                            "iteration_s": round(
                                statistics.median(r["perf/iteration_s"] for r in rows[1:]), 3
                            ),
                        }
                    )
    finally:
        ray.shutdown()
    for name, accs in finals.items():
        emit(
            {
                "bench": "vllm_tis_median",
                "arm": name,
                "seeds": list(args.seeds),
                "eval_accuracy_last": [round(a, 4) for a in accs],
                "median": round(statistics.median(accs), 4),
            }
        )
