"""CartPole-v1 targets: PPO (return >= 450 within 200k steps, <= 40 s) and DQN (>= 450 within 200k).

``--learners 2`` runs the same target with 2 DDP learner ranks (0.5 CPU each, 0.25 CPU
per env runner) to compare with 1.

Usage: python benchmarks/bench_cartpole.py [--algo ppo|dqn|both] [--seeds 1 2 3] [--learners 1 2]
"""

from __future__ import annotations

import argparse

from _common import emit, train_cli


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--algo", choices=["ppo", "dqn", "both"], default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--learners", type=int, nargs="+", default=[1])
    args = p.parse_args()
    algos = ["ppo", "dqn"] if args.algo == "both" else [args.algo]
    for algo in algos:
        for learners, seed in ((n, s) for n in args.learners for s in args.seeds):
            extra = []
            if learners > 1:
                extra = [
                    f"resources.num_learners={learners}",
                    f"resources.cpus_per_learner={1.0 / learners}",
                    "resources.cpus_per_rollout_actor=0.25",
                ]
            s = train_cli(
                f"examples/cartpole_{algo}.yaml", ["stop_return=450", f"seed={seed}", *extra]
            )
            ret = s["episode_return_mean"] or 0.0
            emit(
                {
                    "bench": f"cartpole_{algo}",
                    "seed": seed,
                    "learners": learners,
                    "reached_450": ret >= 450 and s["env_steps"] <= 200_000,
                    "episode_return_mean": ret,
                    "env_steps": s["env_steps"],
                    "command_wall_s": s["command_wall_s"],
                    "train_wall_s": s["wall_s"],
                    "target_wall_s": 40 if algo == "ppo" else None,
                }
            )


if __name__ == "__main__":
    main()
