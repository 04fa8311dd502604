"""Env-runner throughput with 1 and 2 actors (target: >= 1.7x env steps/s from 1 to 2).

Each actor holds 1 CPU and steps ``num_envs`` CartPole copies with a fixed PPO policy;
the driver only waits. Throughput = total env steps / wall time over ``--rounds`` samples.

Usage: python benchmarks/bench_env_runners.py [--rounds 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
from _common import emit

from rlft_ray.config import build_config
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.rollout.env_runner import EnvRunner


def throughput(num_actors: int, rounds: int, cfg) -> float:
    cls = get_learner_cls(cfg.algo)
    actor_cls = ray.remote(EnvRunner).options(num_cpus=1)
    actors = [actor_cls.remote(**cls.sampler_kwargs(cfg, i)) for i in range(num_actors)]
    ray.get([a.sample.remote() for a in actors])  # warm up (imports, first forward)
    start = time.perf_counter()
    steps = 0
    for _ in range(rounds):
        batches = ray.get([a.sample.remote() for a in actors])
        steps += sum(b.num_steps for b in batches)
    elapsed = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return steps / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = build_config(
        None,
        [
            "env.num_envs_per_runner=8",
            "ppo.rollout_steps=256",
            "resources.cpus_per_rollout_actor=1",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # Alternate 1 and 2 actors and keep medians: background load drifts on a small machine.
    ones, twos = [], []
    for _ in range(args.repeats):
        ones.append(throughput(1, args.rounds, cfg))
        twos.append(throughput(2, args.rounds, cfg))
    one, two = statistics.median(ones), statistics.median(twos)
    emit(
        {
            "bench": "env_runner_throughput",
            "env": cfg.env.id,
            "envs_per_actor": cfg.env.num_envs_per_runner,
            "steps_per_s_1_actor": round(one),
            "steps_per_s_2_actors": round(two),
            "speedup": round(two / one, 3),
            "target_speedup": 1.7,
        }
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
