"""GRPO side by side with TRL's ``GRPOTrainer`` (``pip install -e ".[bench]"``).

Both train the same SFT base (``--base``, e.g. ``runs/q/sft_base`` from ``rlft-ray
quickstart``) on the same prompts (``data/arith_train.jsonl``, exact-match reward) with the
quickstart RL phase's settings: 500 steps of 16 prompts x 8 completions, at most 8 new
tokens, temperature 1, no KL (beta 0), clip 0.2, group-normalised advantages,
sequence-mean-token-mean loss (TRL's ``loss_type="grpo"``), constant lr 5e-4, grad norm 1.
TRL runs in one process with both cores; rlft_ray runs its example (2 generation actors +
1 learner). Each in a fresh process, per seed, alternating. Printed: iterations/s of the
training loop, the command's wall seconds (and rlft_ray's start-up breakdown), the ratio
of iterations per second over the whole command (``ratio_phase_iterations_per_s``: TRL's
command seconds over ours), and held-out greedy exact-match on ``data/arith_test.jsonl`` of
the final model (the same scorer for both).

With ``--curves``, both also measure held-out exact-match every 25 steps while they train
(TRL through a callback in its process, rlft_ray through ``eval_every`` on its actors; each
pays for its own evaluations), and the benchmark prints accuracy against wall seconds from
the training loop's start at every 15 s mark, how many marks rlft_ray is at or above TRL,
and the seconds each takes to first reach the best accuracy TRL's run reaches.

Ours runs the example as it is, which overlaps sampling with the update
(``async_rollouts: true``, policy lag 1); with ``--sync`` it runs synchronously
(``async_rollouts=false``). TRL's side is the same either way.

Usage: python benchmarks/vs_trl_grpo.py --base runs/q/sft_base [--seeds 0 1 2] [--steps 500] [--curves] [--sync]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, emit, train_cli, trl_grpo_config

EVAL_EVERY, MARK_S = 25, 15.0


def trl_run(base: str, out: str, seed: int, steps: int, curves: bool) -> None:
    """In a fresh process: TRL's GRPOTrainer; prints one JSON line."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from envs.arithmetic import exact_match
    from rlft_ray.config import build_config
    from rlft_ray.lm.prompts import load_prompts, prompts_from_batch
    from rlft_ray.rollout.evaluate import evaluate_model
    from rlft_ray.rollout.generation import GenerationActor

    torch.set_num_threads(2)

    def reward(
        prompts: list[str], completions: list[str], answer: list, **_: object
    ) -> list[float]:
        return exact_match(prompts, completions, [{"answer": a} for a in answer])

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    data = load_dataset("json", data_files=str(ROOT / "data" / "arith_train.jsonl"), split="train")
    args = trl_grpo_config(
        out,
        seed,
        steps,
        per_device_train_batch_size=128,  # completions per step: 16 prompts x 8
        num_generations=8,
        max_completion_length=8,
        beta=0.0,
        learning_rate=5e-4,
        logging_steps=50,
    )
    lm = build_config(ROOT / "examples" / "arithmetic_grpo.yaml", [f"lm.model={base}"]).lm
    curve: list[tuple[float, int, float]] = []

    class HeldOut(TrainerCallback):
        """Greedy exact-match on the held-out prompts every EVAL_EVERY steps, in-process."""

        def __init__(self) -> None:
            self.actor = GenerationActor(lm, seed=seed, num_threads=2)
            table, _ = load_prompts(ROOT / "data" / "arith_test.jsonl", self.actor.tokenizer, lm)
            self.prompts = prompts_from_batch(table)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % EVAL_EVERY == 0 or state.global_step == steps:
                self.actor.model.load_state_dict(model.state_dict())
                _, scores = self.actor.evaluate(self.prompts)
                curve.append((time.perf_counter() - start, state.global_step, float(scores.mean())))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[HeldOut()] if curves else None,
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    acc = evaluate_model(out, ROOT / "data" / "arith_test.jsonl", lm)["accuracy"]
    print(json.dumps({"train_s": train_s, "accuracy": acc, "curve": curve}), flush=True)


def trl(base: str, seed: int, steps: int, curves: bool) -> dict:
    out = tempfile.mkdtemp(prefix="rlft_vs_trl_")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-run", base, out, str(seed), str(steps), str(curves)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "who": "trl",
        "seed": seed,
        "iterations_per_s": round(steps / r["train_s"], 2),
        "train_s": round(r["train_s"], 1),
        "command_s": round(time.time() - start, 1),
        "eval_accuracy": round(r["accuracy"], 3),
        "curve": [(round(t, 1), step, round(a, 3)) for t, step, a in r["curve"]],
    }


def ours(base: str, seed: int, steps: int, curves: bool, sync: bool = False) -> dict:
    summary = train_cli(
        "examples/arithmetic_grpo.yaml",
        [
            f"lm.model={base}",
            f"seed={seed}",
            f"total_iterations={steps}",
            f"eval_every={EVAL_EVERY if curves else steps}",
            *(["async_rollouts=false"] if sync else []),
        ],
    )
    out = Path(summary["output_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    loop_s = rows[-1]["time/wall_s"]
    curve = [
        (round(r["time/wall_s"], 1), int(r["counters/iteration"]), round(r["eval/accuracy"], 3))
        for r in rows
        if "eval/accuracy" in r
    ]
    return {
        "who": "rlft_ray",
        "async_rollouts": yaml.safe_load((out / "config.yaml").read_text())["async_rollouts"],
        "seed": seed,
        "iterations_per_s": round(steps / loop_s, 2),
        "train_s": round(loop_s, 1),
        "command_s": round(summary["command_wall_s"], 1),
        "eval_accuracy": round(rows[-1]["eval/accuracy"], 3),
        "startup": summary.get("startup"),  # imports, checks, Ray, actors, Train start, ...
        "curve": curve if curves else [],
    }


def compare_curves(ours_curve: list, trl_curve: list) -> dict:
    """Accuracy at every 15 s mark (the last evaluation at or before it), and the seconds
    each run takes to first reach the best accuracy TRL's run reaches."""
    end = max(ours_curve[-1][0], trl_curve[-1][0])
    marks = [MARK_S * k for k in range(1, int(end // MARK_S) + 1)]

    def at(curve: list, t: float) -> float | None:
        seen = [a for s, _, a in curve if s <= t]
        return seen[-1] if seen else None

    pairs = [(m, at(ours_curve, m), at(trl_curve, m)) for m in marks]
    scored = [(o, t) for _, o, t in pairs if t is not None]
    best = max(a for _, _, a in trl_curve)

    def first(curve: list) -> float | None:
        return next((s for s, _, a in curve if a >= best), None)

    t_trl, t_ours = first(trl_curve), first(ours_curve)
    return {
        "marks": [(m, o, t) for m, o, t in pairs],
        "marks_ours_at_or_above": sum(o is not None and o >= t for o, t in scored),
        "marks_with_trl": len(scored),
        "trl_best_accuracy": best,
        "seconds_to_trl_best": {"trl": t_trl, "rlft_ray": t_ours},
        "ratio_time_to_trl_best": round(t_ours / t_trl, 2) if t_ours and t_trl else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default=str(ROOT / "runs" / "q" / "sft_base"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--curves", action="store_true", help="held-out accuracy every 25 steps")
    p.add_argument(
        "--sync",
        action="store_true",
        help="run ours with async_rollouts=false (the example overlaps sampling and updates)",
    )
    p.add_argument("--trl-run", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_run:
        base, out, seed, steps, curves = args.trl_run
        trl_run(base, out, int(seed), int(steps), curves == "True")
        return
    runs: dict[str, list[dict]] = {"trl": [], "rlft_ray": []}
    for seed in args.seeds:
        for fn in (trl, functools.partial(ours, sync=args.sync)):
            r = fn(str(Path(args.base).resolve()), seed, args.steps, args.curves)
            runs[r["who"]].append(r)
            emit({"benchmark": "vs_trl_grpo", **r})
        if args.curves:
            pair = compare_curves(runs["rlft_ray"][-1]["curve"], runs["trl"][-1]["curve"])
            emit({"benchmark": "vs_trl_grpo_curves", "seed": seed, **pair})
    med = {
        who: {
            k: statistics.median(r[k] for r in rs)
            for k in ("iterations_per_s", "command_s", "eval_accuracy")
        }
        for who, rs in runs.items()
    }
    emit(
        {
            "benchmark": "vs_trl_grpo",
            "seeds": args.seeds,
            "steps": args.steps,
            "async_rollouts": runs["rlft_ray"][-1]["async_rollouts"],
            **{f"{who}_{k}": v for who, m in med.items() for k, v in m.items()},
            "ratio_iterations_per_s": round(
                med["rlft_ray"]["iterations_per_s"] / med["trl"]["iterations_per_s"], 2
            ),
            "ratio_command_s": round(med["rlft_ray"]["command_s"] / med["trl"]["command_s"], 2),
            # the measure: iterations over the whole command, start to exit
            "ratio_phase_iterations_per_s": round(
                med["trl"]["command_s"] / med["rlft_ray"]["command_s"], 2
            ),
        }
    )


if __name__ == "__main__":
    main()
