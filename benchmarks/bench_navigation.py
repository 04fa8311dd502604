"""Navigation: >= 90 % success from scratch; fine-tuning on a moved goal needs <= 50 % of the steps.

Trains PPO on rlft/Navigation-v0 (goal (0.5, 0.5)) until 90 % of the last 20 episodes
succeed, then (a) fine-tunes that checkpoint on goal (-0.5, -0.5) with PPO, (b) fine-tunes
it with filtered behaviour cloning (rejection sampling on the env runners' episodes,
``examples/navigation_filtered_bc.yaml``) and (c) trains the moved goal from scratch,
all to the same bar, and compares env steps.

Usage: python benchmarks/bench_navigation.py [--seeds 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import emit, train_cli

MOVED = "env.kwargs.goal=[-0.5,-0.5]"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    for seed in args.seeds:
        root = Path(tempfile.mkdtemp(prefix="rlft_nav_"))
        bar = ["stop_success_rate=0.9", f"seed={seed}"]
        base = train_cli("examples/navigation_ppo.yaml", bar, root / "base")
        scratch = train_cli("examples/navigation_ppo.yaml", [*bar, MOVED], root / "scratch")
        tuned = train_cli(
            "examples/navigation_ppo.yaml",
            [*bar, MOVED, f"init_from={base['output_dir']}/checkpoint_last"],
            root / "finetune",
        )
        filtered = train_cli(
            "examples/navigation_filtered_bc.yaml",
            [*bar, f"init_from={base['output_dir']}/checkpoint_last"],
            root / "filtered_bc",
        )
        emit(
            {
                "bench": "navigation_ppo",
                "seed": seed,
                "base_success_rate": base["success_rate"],
                "base_env_steps": base["env_steps"],
                "moved_goal_scratch_env_steps": scratch["env_steps"],
                "moved_goal_scratch_success_rate": scratch["success_rate"],
                "moved_goal_finetune_env_steps": tuned["env_steps"],
                "moved_goal_finetune_success_rate": tuned["success_rate"],
                "finetune_over_scratch": round(tuned["env_steps"] / scratch["env_steps"], 3),
                "moved_goal_filtered_bc_env_steps": filtered["env_steps"],
                "moved_goal_filtered_bc_success_rate": filtered["success_rate"],
                "moved_goal_filtered_bc_wall_s": filtered["command_wall_s"],
                "target_ratio": 0.5,
            }
        )


if __name__ == "__main__":
    main()
