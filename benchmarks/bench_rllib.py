"""RLlib in the loop: fine-tuning an RLlib-pretrained agent, SAC, multi-agent, overhead.

Parts (``--parts``, all by default; each prints JSON lines):

* ``finetune``: RLlib's PPO (``algo: rllib``) learns CartPole (``rlft/CartPole-v1``, default
  physics) to the bar; then, on a changed CartPole (``--gravity``, ``--length``), env steps
  to the same bar from scratch vs from that RLlib checkpoint (``init_from``), with our PPO
  (the RLlib module mapped onto our actor-critic) and with ``algo: rllib`` PPO, side by
  side. Target: fine-tuning needs <= 0.5x the env steps of scratch.
* ``sac``: ``examples/pendulum_rllib_sac.yaml``; target: return >= -250.
* ``multi``: ``examples/multi_nav_rllib_ppo.yaml``; target: both agents succeed >= 0.9.
* ``overhead``: the same RLlib PPO config to the same return, bare (``Algorithm.train()``
  in a loop) and through ``rlft-ray`` (``run_training``), in one process on one Ray
  instance; target: wall seconds <= 1.1x bare.

Usage: python benchmarks/bench_rllib.py [--parts finetune sac multi overhead] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, emit

from rlft_ray.config import build_config
from rlft_ray.run.metrics import read_metrics

BAR = 450.0
RLLIB_PPO = "examples/cartpole_rllib_ppo.yaml"
OUR_PPO = "examples/cartpole_ppo.yaml"
# our PPO's network is RLlib's default-module layout with the example's [64, 64] tanh MLPs;
# both of its runs (scratch and fine-tune) use the RLlib agent's learning rate: with the
# example's 1e-3 the first updates undid the pretrained policy (seed 0: 0.915x scratch's steps)
OUR_PPO_FITS = ["ppo.hidden_sizes=[64, 64]", "ppo.lr=0.0003"]


def train(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One run in this process (Ray stays up between runs); its summary plus env steps to
    the first row at the bar."""
    from rlft_ray.run.driver import run_training

    cfg = build_config(ROOT / config, overrides)
    start = time.perf_counter()
    summary = run_training(cfg, out, progress=False)
    summary["run_wall_s"] = round(time.perf_counter() - start, 2)
    summary["steps_to_bar"] = steps_to(out, cfg.stop_return)
    summary["first_return"] = next(
        (
            r["rollout/episode_return_mean"]
            for r in read_metrics(out)
            if "rollout/episode_return_mean" in r
        ),
        None,
    )
    return summary


def steps_to(out: Path, bar: float | None) -> int | None:
    """Env steps of the first iteration whose last-20-episode return reached ``bar``."""
    if bar is None:
        return None
    for row in read_metrics(out):
        if (
            row.get("rollout/episode_return_mean", -1e9) >= bar
            and row.get("counters/episodes", 20) >= 20
        ):
            return int(row["counters/env_steps"])
    return None


def finetune(
    root: Path,
    seed: int,
    changed: list[str],
    budget: int,
    pretrained: Path | None = None,
    learners: tuple[str, ...] = ("ours_ppo", "rllib_ppo"),
    ours: tuple[str, ...] = (),
) -> None:
    env = ["env.id=rlft/CartPole-v1"]
    common = [f"seed={seed}", f"stop_return={BAR}", f"total_env_steps={budget}"]
    if pretrained is None:  # RLlib's PPO on the default physics, to the bar
        base = train(RLLIB_PPO, [*env, *common], root / "rllib_base")
        emit({"bench": "rllib_pretrain", "seed": seed, **_brief(base)})
        pretrained = root / "rllib_base" / "checkpoint_last"
    init = f"init_from={pretrained}"
    for algo, config, extra in (
        ("ours_ppo", OUR_PPO, [*OUR_PPO_FITS, *ours]),
        ("rllib_ppo", RLLIB_PPO, []),
    ):
        if algo not in learners:
            continue
        scratch = train(config, [*env, *changed, *common, *extra], root / f"{algo}_scratch")
        tuned = train(config, [*env, *changed, *common, *extra, init], root / f"{algo}_finetune")
        s, t = scratch["steps_to_bar"], tuned["steps_to_bar"]
        emit(
            {
                "bench": "rllib_finetune_changed_cartpole",
                "learner": algo,
                "seed": seed,
                "changed": changed,
                "overrides": extra,
                "bar": BAR,
                "scratch_steps_to_bar": s,
                "finetune_steps_to_bar": t,
                "finetune_first_return": tuned["first_return"],
                "scratch_first_return": scratch["first_return"],
                "ratio": round(t / s, 3) if s and t is not None else None,
                "target_ratio": 0.5,
                "met": bool(s and t is not None and t <= 0.5 * s),
                "scratch_wall_s": scratch["run_wall_s"],
                "finetune_wall_s": tuned["run_wall_s"],
            }
        )


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "env_steps",
        "episode_return_mean",
        "success_rate",
        "run_wall_s",
        "steps_to_bar",
        "status",
    )
    return {k: summary.get(k) for k in keys}


def sac(root: Path, seed: int, budget: int) -> None:
    out = train(
        "examples/pendulum_rllib_sac.yaml",
        [f"seed={seed}", f"total_env_steps={budget}"],
        root / "sac",
    )
    ret = out["episode_return_mean"]
    emit(
        {
            "bench": "rllib_sac_pendulum",
            "seed": seed,
            **_brief(out),
            "target": -250,
            "met": ret is not None and ret >= -250,
        }
    )


def multi(root: Path, seed: int, budget: int, time_limit: float | None = None) -> None:
    limit = [f"time_limit_s={time_limit}"] if time_limit else []
    out = train(
        "examples/multi_nav_rllib_ppo.yaml",
        [f"seed={seed}", f"total_env_steps={budget}", "stop_success_rate=0.9", *limit],
        root / "multi",
    )
    rate = out["success_rate"]
    rows = read_metrics(root / "multi")
    agents = (
        {k: v for k, v in rows[-1].items() if k.startswith("rollout/agent_return_mean/")}
        if rows
        else {}
    )
    emit(
        {
            "bench": "rllib_multi_nav",
            "seed": seed,
            **_brief(out),
            "agent_returns": agents,
            "target": 0.9,
            "met": rate is not None and rate >= 0.9,
        }
    )


def bare_rllib(cfg: Any, bar: float, budget: int) -> tuple[float, int, float | None]:
    """The run's RLlib config trained by a plain ``Algorithm.train()`` loop to ``bar``:
    (wall seconds from building the algorithm, env steps, return)."""
    from rlft_ray.learners.rllib import probe_env, register_rllib_env
    from rlft_ray.run.rllib_metrics import episode_lists
    from rlft_ray.run.rllib_run import _algo_config, driver_threads

    start = time.perf_counter()
    register_rllib_env()
    algo_config = _algo_config(cfg, probe_env(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(driver_threads(cfg, algo_config))  # as rlft-ray runs it
    algo = algo_config.build_algo()
    steps, ret, recent = 0, None, deque(maxlen=20)  # the stop rule rlft-ray applies
    while steps < budget:
        result = algo.train()
        steps = int(result["num_env_steps_sampled_lifetime"])
        recent.extend(episode_lists(result["env_runners"])[0])
        ret = sum(recent) / len(recent) if recent else None
        if len(recent) == 20 and ret >= bar:
            break
    algo.stop()
    torch.set_num_threads(threads)
    return time.perf_counter() - start, steps, ret


def overhead(root: Path, seed: int, bar: float, budget: int) -> None:
    """Bare RLlib vs the same config through rlft-ray, to the same return, on one Ray
    instance, in the order bare, rlft-ray, bare (the first run also pays for lazy imports)."""
    from rlft_ray.run.ray_session import init_ray

    overrides = [f"seed={seed}", f"stop_return={bar}", f"total_env_steps={budget}"]
    cfg = build_config(ROOT / RLLIB_PPO, overrides)
    init_ray(None)
    first_s, steps, ret = bare_rllib(cfg, bar, budget)
    ours = train(RLLIB_PPO, overrides, root / "overhead_rlft")
    second_s, _, _ = bare_rllib(cfg, bar, budget)
    bare_s = min(first_s, second_s)
    emit(
        {
            "bench": "rllib_overhead",
            "seed": seed,
            "bar": bar,
            "bare_wall_s": [round(first_s, 2), round(second_s, 2)],
            "bare_env_steps": steps,
            "bare_return": ret,
            "rlft_wall_s": ours["run_wall_s"],
            "rlft_env_steps": ours["env_steps"],
            "rlft_return": ours["episode_return_mean"],
            "ratio_vs_faster_bare": round(ours["run_wall_s"] / bare_s, 3),
            "target_ratio": 1.1,
            "met": ours["run_wall_s"] <= 1.1 * bare_s,
        }
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", nargs="+", default=["finetune", "sac", "multi", "overhead"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gravity", type=float, default=15.0)
    p.add_argument("--length", type=float, default=0.8)
    p.add_argument("--budget", type=int, default=200_000, help="env steps per CartPole run")
    p.add_argument("--sac-steps", type=int, default=40_000)
    p.add_argument("--multi-steps", type=int, default=300_000)
    p.add_argument("--overhead-bar", type=float, default=200.0)
    p.add_argument(
        "--pretrained", type=Path, default=None, help="reuse an RLlib CartPole checkpoint"
    )
    p.add_argument(
        "--learners", nargs="+", default=["ours_ppo", "rllib_ppo"], help="finetune's learners"
    )
    p.add_argument(
        "--ours-overrides", nargs="*", default=[], help="overrides of our PPO's two runs"
    )
    p.add_argument("--time-limit", type=float, default=None, help="time_limit_s of the multi run")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlft_bench_rllib_"))
    changed = [f"env.kwargs.gravity={args.gravity}", f"env.kwargs.length={args.length}"]
    for part in args.parts:
        if part == "finetune":
            finetune(
                root,
                args.seed,
                changed,
                args.budget,
                args.pretrained,
                tuple(args.learners),
                tuple(args.ours_overrides),
            )
        elif part == "sac":
            sac(root, args.seed, args.sac_steps)
        elif part == "multi":
            multi(root, args.seed, args.multi_steps, args.time_limit)
        elif part == "overhead":
            overhead(root, args.seed, args.overhead_bar, args.budget)
        else:
            raise SystemExit(f"unknown part {part!r}")
    print(json.dumps({"bench": "rllib_done", "dir": str(root)}), flush=True)


if __name__ == "__main__":
    main()
