"""The ``rlft-ray`` command line.

Every subcommand validates its input before starting Ray and exits non-zero with
a one-line error naming the cause.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlft_ray.checkpoint import CheckpointError
from rlft_ray.config import ConfigError, build_config
from rlft_ray.resources import ResourceError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlft-ray",
        description="Distributed RL fine-tuning on Ray: rollout actors + Ray Train learners.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML run file plus dotted key=value overrides")
    t.add_argument("config", help="YAML run file (e.g. examples/cartpole_ppo.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=3e-4 resources.num_rollout_actors=2")
    t.add_argument("--output-dir", type=Path, default=None, help="run directory (default: runs/<config>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")

    e = sub.add_parser("eval", help="evaluate a checkpoint's policy on its env")
    e.add_argument("checkpoint", type=Path, help="checkpoint directory (e.g. runs/a/checkpoint_best)")
    e.add_argument("--episodes", type=int, default=20)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy/mean action")
    e.add_argument("overrides", nargs="*", help="env overrides, e.g. env.kwargs.goal=[-0.5,-0.5]")

    tu = sub.add_parser("tune", help="hyperparameter search with Ray Tune from a spec (e.g. tuning/cartpole_ppo_asha.yaml)")
    tu.add_argument("spec", type=Path, help="tuning spec YAML: run config, search space, scheduler, search algorithm")
    tu.add_argument("--output-dir", type=Path, default=None, help="search directory (default: runs/tune-<spec>-<time>)")
    tu.add_argument("--resume", action="store_true", help="continue the interrupted search in --output-dir")
    tu.add_argument("--quiet", action="store_true", help="no Tune status tables while it runs")

    q = sub.add_parser("quickstart", help="the main job: CartPole PPO on local embedded Ray (~1 min on 2 cores)")
    q.add_argument("--output-dir", type=Path, default=None)
    q.add_argument("overrides", nargs="*", help="dotted overrides for examples/cartpole_ppo.yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlft-ray`` / ``python -m rlft_ray``."""
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "quickstart": _quickstart, "tune": _tune}[args.command](args)
    except (ConfigError, CheckpointError, ResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from rlft_ray.driver import RunError

        if isinstance(exc, RunError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def _default_dir(config: Path) -> Path:
    return Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(args: argparse.Namespace) -> int:
    cfg = build_config(args.config, args.overrides)
    output_dir = args.output_dir or _default_dir(Path(args.config))
    from rlft_ray.driver import run_training

    summary = run_training(cfg, output_dir, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from rlft_ray.tune import format_table, run_search

    if args.resume and args.output_dir is None:
        raise ConfigError("--resume", "needs --output-dir of the search to continue")
    output_dir = args.output_dir or Path("runs") / f"tune-{args.spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_search(args.spec, output_dir, resume=args.resume, verbose=0 if args.quiet else 1)
    print(format_table(result.rows, result.metric))
    print(f"\nsearch directory: {result.output_dir}  ({result.wall_s:.0f} s)")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    if result.best is None:
        print("error: no trial reported a finite metric; see the error column", file=sys.stderr)
        return 1
    print(f"best: trial {result.best['trial']} {result.metric}={result.best['value']:.4g}")
    print(f"  evaluate: rlft-ray eval {result.best['checkpoint']}")
    print(f"  retrain:  {result.best['train_command']}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    config = EXAMPLES / "cartpole_ppo.yaml"
    cfg = build_config(config, ["stop_return=475", *args.overrides])
    output_dir = args.output_dir or _default_dir(Path("quickstart"))
    from rlft_ray.driver import run_training

    summary = run_training(cfg, output_dir, progress=True)
    print(json.dumps(summary, indent=2))
    print(f"\nrun directory: {output_dir}\nevaluate with: rlft-ray eval {output_dir}/checkpoint_best --episodes 20")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rlft_ray.checkpoint import load_config_from_checkpoint, load_modules
    from rlft_ray.learners.base import Spaces
    from rlft_ray.registry import get_learner_cls
    from rlft_ray.rollout.env_runner import evaluate_policy, probe_spaces

    if args.episodes < 1:
        raise ConfigError("--episodes", "must be >= 1")
    saved = load_config_from_checkpoint(args.checkpoint)
    cfg = build_config(base=_plain(saved), overrides=args.overrides) if args.overrides else saved
    spaces = Spaces(*probe_spaces(cfg.env))
    policy = get_learner_cls(cfg.algo).make_policy(cfg, spaces)
    load_modules(args.checkpoint, {"policy": policy})
    policy.eval()
    stats = evaluate_policy(policy, cfg.env, args.episodes, args.seed, deterministic=not args.stochastic)
    import numpy as np

    result = {
        "checkpoint": str(args.checkpoint),
        "env": cfg.env.id,
        "episodes": args.episodes,
        "episode_return_mean": float(np.mean(stats.returns)),
        "episode_return_std": float(np.std(stats.returns)),
        "episode_len_mean": float(np.mean(stats.lengths)),
    }
    if stats.successes:
        result["success_rate"] = float(np.mean(stats.successes))
    print(json.dumps(result, indent=2))
    return 0


def _plain(cfg: object) -> dict:
    from rlft_ray.config import to_dict

    return to_dict(cfg)
