"""LM agents with tools: GRPO on rlft/ToolArithmetic-v0 from a tool-format SFT base, the
no-tool control, GuessNumber turns, and multi- vs single-turn sampling throughput.

Targets (issue 29): from an SFT base that has seen the tool format on a few hundred
demonstrations, GRPO raises held-out exact match on 3x3-digit products to >= 80 % within
10 minutes on 2 cores (tool call rate reported); the same model without the tool stays near
its no-tool accuracy; on rlft/GuessNumber-v0 the mean turns to the answer fall by >= 30 %
from the SFT base; multi-turn rollouts reach >= 0.8x the single-turn tokens/s of the same
actor. Per seed:

1. ``rlft-ray make-agent-base`` (ToolArithmetic demonstrations, half calling the
   calculator) and greedy held-out episodes of the base, with and without the tool;
2. ``rlft-ray train examples/tool_arithmetic_grpo.yaml`` for ``--grpo-seconds`` with
   held-out accuracy every 10 iterations (a curve against training seconds); the trained
   checkpoint evaluated with and without the tool;
3. the same for GuessNumber (its base, from demonstrations that ignore the feedback on
   half the episodes, then GRPO for ``--guess-seconds``): mean greedy turns;
4. throughput: one actor (no Ray), 8 seeds x 8 episodes of ToolArithmetic against one
   ``generate`` of the same reset prompts x 8 with the same token budget per turn,
   alternating, on the SFT base and on the GRPO policy; tokens per wall second and per
   CPU second of the process (a shared machine inflates the first), decode steps and
   tokens per step, prefill tokens with the turn cache and re-reading, and the same
   episodes without parking (every call runs to its last row; the two multi-turn runs
   swap places every repeat);
5. ``--only real`` (not by default; ``benchmarks/agent_real.py``): SmolLM2-135M-Instruct
   on ToolArithmetic in ChatML, its greedy tool call rate before and after a short GRPO.

Usage: python benchmarks/agent_tools.py [--seeds 0 1 2] [--grpo-seconds 600] [--work DIR]
    [--log FILE] [--only tools guess throughput real] [--reuse-bases]
Prints JSON lines: one per seed and section, then one median line per target (over the
seeds of this invocation and those ``--log`` holds from earlier ones).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

from _common import emit as _emit
from _common import eval_curve, last_mean, medians, run_cli, train_cli
from agent_real import real_tools

EXAMPLE = "examples/tool_arithmetic_grpo.yaml"
HELDOUT = 1_000_000


def heldout(model: Path, env_id: str, kwargs: dict[str, Any], episodes: int, lm: dict) -> dict:
    """Greedy episodes on held-out seeds (this process, no Ray)."""
    from rlft_ray.config import EnvConfig, LMConfig
    from rlft_ray.rollout.evaluate import evaluate_agent

    result = evaluate_agent(
        model,
        LMConfig(model=str(model), **lm),
        EnvConfig(id=env_id, kwargs=kwargs),
        range(HELDOUT, HELDOUT + episodes),
    )
    return {
        k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k != "examples"
    }


TOOL_LM = {"max_new_tokens": 24, "max_turns": 3, "max_prompt_tokens": 16, "max_episode_tokens": 100}
GUESS_LM = {"max_new_tokens": 4, "max_turns": 8, "max_prompt_tokens": 16, "max_episode_tokens": 120}


def make_base(base: Path, seed: int, args: argparse.Namespace, *extra: str) -> float | None:
    """``rlft-ray make-agent-base BASE`` with the benchmark's SFT budget; returns seconds
    (None: ``--reuse-bases`` and BASE already holds one, used as is)."""
    if args.reuse_bases and (base / "sft_base" / "config.json").is_file():
        return None
    return run_cli(
        "make-agent-base",
        str(base),
        *extra,
        "--seed",
        str(seed),
        "--steps",
        str(args.sft_steps),
        "--seconds",
        str(args.sft_seconds),
    )


def tool_arithmetic(seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = work / "tool_base"
    sft_s = make_base(base, seed, args)
    model = base / "sft_base"
    before = heldout(model, "rlft/ToolArithmetic-v0", {}, args.episodes, TOOL_LM)
    before_no_tool = heldout(model, "rlft/ToolArithmetic-v0", {"tools": []}, args.episodes, TOOL_LM)
    run = train_cli(
        EXAMPLE,
        [
            f"lm.model={model}",
            f"seed={seed}",
            f"time_limit_s={args.grpo_seconds}",
            "total_iterations=100000",
            f"eval_episodes={args.episodes}",
        ],
        work / "grpo",
        tries=3,
    )
    ckpt = work / "grpo" / "checkpoint_last" / "policy"
    after = heldout(ckpt, "rlft/ToolArithmetic-v0", {}, args.episodes, TOOL_LM)
    after_no_tool = heldout(ckpt, "rlft/ToolArithmetic-v0", {"tools": []}, args.episodes, TOOL_LM)
    points = eval_curve(work / "grpo")
    reach = next((t for t, acc in points if acc >= 0.8), None)
    return {
        "task": "ToolArithmetic-v0 GRPO",
        "seed": seed,
        "sft_command_s": None if sft_s is None else round(sft_s, 1),
        "accuracy_before": before["accuracy"],
        "tool_calls_before": before["tool_calls_mean"],
        "accuracy_before_no_tool": before_no_tool["accuracy"],
        "accuracy_after": after["accuracy"],
        "tool_calls_after": after["tool_calls_mean"],
        "accuracy_after_no_tool": after_no_tool["accuracy"],
        "train_tool_calls_last5": last_mean(work / "grpo", "rollout/tool_calls_mean"),
        "iterations": run["iterations"],
        "train_s": run["wall_s"],
        "seconds_to_80pct": reach,
        "target_met": after["accuracy"] >= 0.8 and reach is not None and reach <= 600,
        "curve": points,
    }


def guess_number(seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = work / "guess_base"
    sft_s = make_base(base, seed, args, "--env", "rlft/GuessNumber-v0")
    model = base / "sft_base"
    before = heldout(model, "rlft/GuessNumber-v0", {}, args.episodes, GUESS_LM)
    overrides = [
        f"lm.model={model}",
        "env.id=rlft/GuessNumber-v0",
        "env.kwargs={}",
        *(f"lm.{k}={v}" for k, v in GUESS_LM.items()),
        # DAPO's token-level loss (Yu et al. 2025; Dr. GRPO, Liu et al. 2025, on the bias):
        # GRPO's per-episode mean gives each guess of a long, failed episode a fraction of
        # the weight of a short episode's, so the behaviour that costs turns was hardly
        # pushed down (median -27 % in 300 s; 600 s: -33 % and -20 %).
        "grpo.loss_agg=token-mean",
        f"seed={seed}",
        f"time_limit_s={args.guess_seconds}",
        "total_iterations=100000",
        f"eval_episodes={args.episodes}",
    ]
    run = train_cli(EXAMPLE, overrides, work / "guess", tries=3)
    after = heldout(
        work / "guess" / "checkpoint_last" / "policy",
        "rlft/GuessNumber-v0",
        {},
        args.episodes,
        GUESS_LM,
    )
    fall = 1 - after["turns_mean"] / max(before["turns_mean"], 1e-9)
    return {
        "task": "GuessNumber-v0 GRPO",
        "seed": seed,
        "base_reused": sft_s is None,
        "turns_before": before["turns_mean"],
        "solved_before": before["accuracy"],
        "turns_after": after["turns_mean"],
        "solved_after": after["accuracy"],
        "turns_fall": round(fall, 4),
        "iterations": run["iterations"],
        "train_s": run["wall_s"],
        "target_met": fall >= 0.3,
    }


def throughput(model: Path, seed: int, policy: str, repeats: int = 41) -> dict[str, Any]:
    """Model tokens per second of one actor: 8 seeds x 8 ToolArithmetic episodes (every turn
    batched) against one generate of the same 8 reset prompts x 8 (single turn)."""
    import torch

    from rlft_ray.config import EnvConfig, LMConfig
    from rlft_ray.rollout import multiturn, turn_cache
    from rlft_ray.rollout.evaluate import seed_prompts
    from rlft_ray.rollout.generation import GenerationActor
    from rlft_ray.rollout.turn_cache import TurnSession
    from rlft_ray.types import Prompt

    torch.set_num_threads(1)
    park_below = turn_cache.PARK_BELOW
    lm = LMConfig(model=str(model), num_samples=8, **TOOL_LM)
    actor = GenerationActor(lm, seed=seed, env=EnvConfig(id="rlft/ToolArithmetic-v0"))
    seeds = list(range(seed * 100, seed * 100 + 8))
    prompts = seed_prompts(seeds)
    multi, single, multi_cpu, single_cpu, reread_cpu, unparked = [], [], [], [], [], []

    class Rereading(TurnSession):
        def keep(self, *args: Any) -> None:  # no cache kept: each turn re-reads everything
            pass

    shapes: list[tuple[int, int]] = []  # (rows, decode steps) of every generate call
    generate_turn = actor.generate_turn

    sessions: list[Any] = []
    reread = [0]  # tokens a turn would feed re-reading every conversation (left-padded)

    def recorded(contexts: list[Prompt], session: Any, *args: Any) -> Any:
        out = generate_turn(contexts, session, *args)
        shapes.append(out.response_ids.shape)
        sessions.append(session)
        reread[0] += len(contexts) * max(len(c.ids) for c in contexts)
        return out

    actor.generate_turn = recorded  # play() calls it once per turn
    texts = actor.sample(prompts).prompts[::8]  # the reset prompts
    plain = [Prompt(t, actor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    steps = rows_per_step = 0.0
    stats: dict[str, int] = {}

    def run_multi() -> None:
        nonlocal steps, rows_per_step
        shapes.clear()
        sessions.clear()
        reread[0] = 0
        start, cpu = time.perf_counter(), time.process_time()
        batch = actor.sample(prompts)
        multi.append(batch.num_tokens / (time.perf_counter() - start))
        multi_cpu.append(batch.num_tokens / (time.process_time() - cpu))
        # this batch's prefills (the re-reading run records its own) and parked turns
        stats.update(
            fed=sessions[-1].fed_tokens,
            fed_reread=reread[0],
            shared=sessions[-1].shared_rows,
            parked=stats.get("parked", 0) + sessions[-1].parked_rows,  # one session a batch
        )
        steps += sum(w for _, w in shapes) / repeats
        rows_per_step += batch.num_tokens / max(sum(w for _, w in shapes), 1) / repeats

    def run_single() -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        one = actor.generate(plain)
        single.append(one.num_tokens / (time.perf_counter() - start))
        single_cpu.append(one.num_tokens / (time.process_time() - cpu))
        return one

    def sampled_per(clock: Any) -> float:
        start = clock()
        return actor.sample(prompts).num_tokens / (clock() - start)

    def run_unparked() -> None:
        with mock.patch.object(turn_cache, "PARK_BELOW", 0.0):  # calls run to their last row
            unparked.append(sampled_per(time.perf_counter))

    def run_rereading() -> None:
        with mock.patch.object(multiturn, "TurnSession", Rereading):  # no cache across turns
            reread_cpu.append(sampled_per(time.process_time))

    one = None  # the last single-turn batch
    for i in range(repeats):  # the two multi-turn runs swap places every repeat
        first, second = (run_multi, run_unparked) if i % 2 == 0 else (run_unparked, run_multi)
        for run in (first, run_single, second, run_single, run_rereading):
            gc.collect()  # no run pays for the garbage of the one before
            one = run() or one
    fed, fed_reread, shared, parked = (
        stats["fed"],
        stats["fed_reread"],
        stats["shared"],
        stats["parked"],
    )
    width = one.response_ids.shape[1]
    m, s = statistics.median(multi), statistics.median(single)
    m_cpu, s_cpu = statistics.median(multi_cpu), statistics.median(single_cpu)
    return {
        "task": "throughput",
        "seed": seed,
        "policy": policy,
        "multi_turn_tokens_per_s": round(m, 1),
        "single_turn_tokens_per_s": round(s, 1),
        "ratio": round(m / s, 3),
        # Continuous batching at the turn level (TurnStops): turns still running once at
        # most park_below of a call's rows run go on in the next call; against every call
        # running until its last row ends.
        "park_below": park_below,
        "multi_turn_parks_per_batch": round(parked / repeats, 2),
        "multi_turn_unparked_tokens_per_s": round(statistics.median(unparked), 1),
        "ratio_unparked": round(statistics.median(unparked) / s, 3),
        # Per second of this process's CPU time (all its threads): what a machine shared
        # with other jobs does not inflate; wall tokens/s above is what a user sees.
        "multi_turn_tokens_per_cpu_s": round(m_cpu, 1),
        "single_turn_tokens_per_cpu_s": round(s_cpu, 1),
        "ratio_cpu": round(m_cpu / s_cpu, 3),
        # The KV cache across turns against re-reading the conversation every turn.
        "multi_turn_rereading_tokens_per_cpu_s": round(statistics.median(reread_cpu), 1),
        "ratio_cpu_rereading": round(statistics.median(reread_cpu) / s_cpu, 3),
        # Load-independent: a decode step of the tiny model costs about the same for 8 or
        # 64 rows, so tokens/s follows the model tokens each step produces.
        "multi_turn_decode_steps": round(steps, 1),
        "multi_turn_tokens_per_step": round(rows_per_step, 1),
        "single_turn_decode_steps": width,
        "single_turn_tokens_per_step": round(one.num_tokens / max(width, 1), 1),
        # The prefills of the last multi-turn batch: fed with the KV cache kept across
        # turns, what re-reading every conversation each turn would feed, and the rows
        # whose reply an identical conversation read for them (shared prefill).
        "multi_turn_prefill_tokens": fed,
        "multi_turn_prefill_tokens_rereading": fed_reread,
        "multi_turn_shared_prefill_rows": shared,
        "target_met": m / s >= 0.8,
    }


def main() -> None:
    os.environ.setdefault("RAY_ADDRESS", "local")  # a fresh local Ray per run
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--grpo-seconds", type=float, default=600.0)
    p.add_argument("--guess-seconds", type=float, default=300.0)
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-seconds", type=float, default=240.0)
    p.add_argument("--episodes", type=int, default=200, help="held-out episodes per evaluation")
    p.add_argument(
        "--work",
        type=Path,
        help="keep each seed's bases and runs in WORK/seed<N> (default: a fresh temp dir); "
        "a later `--only throughput --work WORK` measures their SFT base and GRPO policy",
    )
    p.add_argument(
        "--reuse-bases",
        action="store_true",
        help="with --work: a seed's SFT base already in WORK/seed<N> is used as is, not rebuilt",
    )
    p.add_argument(
        "--log",
        type=Path,
        help="append every seed's JSON line to LOG; the median lines cover every seed LOG "
        "holds (a seed's section run again replaces its earlier line)",
    )
    p.add_argument(
        "--only",
        choices=("tools", "guess", "throughput", "real"),
        nargs="+",
        default=["tools", "guess", "throughput"],
        help="real (not run by default): SmolLM2-135M-Instruct learns to call the "
        "calculator (benchmarks/agent_real.py)",
    )
    p.add_argument("--real-iterations", type=int, default=10)
    p.add_argument("--real-episodes", type=int, default=32, help="held-out episodes (real)")
    args = p.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    section = {
        "ToolArithmetic-v0 GRPO": "tools",
        "GuessNumber-v0 GRPO": "guess",
        "throughput": "throughput",
        "SmolLM2 ToolArithmetic GRPO": "real",
    }
    rerun = {task for task, name in section.items() if name in args.only}
    if args.log is not None and args.log.exists():  # earlier invocations' seeds, last wins
        kept: dict[tuple, dict[str, Any]] = {}
        for line in args.log.read_text().splitlines():
            r = json.loads(line)
            if not (r["task"] in rerun and r["seed"] in args.seeds):  # else: run again now
                kept[(r["seed"], r["task"], r.get("policy"))] = r
        for r in kept.values():
            results.setdefault(section[r["task"]], []).append(r)

    def emit(record: dict[str, Any]) -> None:
        _emit(record)
        if args.log is not None:
            with args.log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    for seed in args.seeds:
        if args.work is None:
            work = Path(tempfile.mkdtemp(prefix=f"rlft_agent_{seed}_"))
        else:
            (work := args.work.resolve() / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        if "tools" in args.only:
            results.setdefault("tools", []).append(r := tool_arithmetic(seed, work, args))
            emit(r)
        if "throughput" in args.only:
            model = work / "tool_base" / "sft_base"
            if not model.is_dir():
                run_cli(
                    "make-agent-base", str(work / "tool_base"), "--steps", "200", "--seconds", "60"
                )
            results.setdefault("throughput", []).append(r := throughput(model, seed, "sft_base"))
            emit(r)
            trained = work / "grpo" / "checkpoint_last" / "policy"
            if trained.is_dir():  # the policy GRPO trains, whose answers no longer ramble
                results["throughput"].append(r := throughput(trained, seed, "grpo"))
                emit(r)
        if "guess" in args.only:
            results.setdefault("guess", []).append(r := guess_number(seed, work, args))
            emit(r)
        if "real" in args.only:
            results.setdefault("real", []).append(r := real_tools(seed, work, args, heldout))
            emit(r)
    # One median line per target (issue 29's targets are medians of 3 seeds).
    targets = {
        "tools": (
            "ToolArithmetic GRPO held-out exact match >= 0.8 (no-tool control stays near its base)",
            (
                "accuracy_before",
                "accuracy_after",
                "accuracy_before_no_tool",
                "accuracy_after_no_tool",
                "tool_calls_before",
                "tool_calls_after",
            ),
            lambda m: m["accuracy_after"] >= 0.8,
        ),
        "guess": (
            "GuessNumber mean turns fall >= 30 % from the SFT base",
            ("turns_before", "turns_after", "turns_fall", "solved_before", "solved_after"),
            lambda m: m["turns_fall"] >= 0.3,
        ),
        "throughput": (
            "multi-turn tokens/s >= 0.8x single-turn on the same actor",
            (
                "multi_turn_tokens_per_s",
                "single_turn_tokens_per_s",
                "ratio",
                "ratio_unparked",
                "multi_turn_parks_per_batch",
                "ratio_cpu",
                "ratio_cpu_rereading",
                "multi_turn_tokens_per_step",
                "single_turn_tokens_per_step",
            ),
            lambda m: m["ratio"] >= 0.8,
        ),
        "real": (
            "SmolLM2-135M-Instruct: the run completes and its tool call rate rises",
            ("tool_calls_before", "tool_calls_after", "accuracy_before", "accuracy_after"),
            lambda m: m["tool_calls_after"] > m["tool_calls_before"],
        ),
    }
    for name, (target, keys, met) in targets.items():
        for policy in sorted({r.get("policy", "") for r in results.get(name, [])}):
            rows = [r for r in results[name] if r.get("policy", "") == policy]
            m = medians(rows, keys)
            _emit(
                {
                    "task": f"median over seeds: {name}",
                    **({"policy": policy} if policy else {}),
                    "target": target,
                    "seeds": sorted(r["seed"] for r in rows),
                    **m,
                    "target_met": met(m),
                }
            )


if __name__ == "__main__":
    main()
