"""``rlft-ray eval``: score a checkpoint (or a bare model directory) on held-out prompts or episodes.

A checkpoint may come from anyone, so its config never makes ``eval`` import or run code
(:data:`UNTRUSTED_KEYS`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlft_ray.config import ConfigError, RunConfig, build_config, to_dict
from rlft_ray.config.algorithms import algorithm_spec


def command(args: argparse.Namespace) -> int:
    from rlft_ray.learners.base import EvalOptions
    from rlft_ray.learners.checkpoint import load_config_from_checkpoint
    from rlft_ray.learners.registry import get_learner_cls

    if args.episodes < 1:
        raise ConfigError("--episodes", "must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", "must be >= 1")
    if getattr(args, "samples", 0) < 0:
        raise ConfigError("--samples", "must be >= 0")
    opts = EvalOptions(
        episodes=args.episodes,
        seed=args.seed,
        stochastic=args.stochastic,
        dataset=args.dataset,
        limit=args.limit,
        samples=getattr(args, "samples", 0),
    )
    if is_model_dir(args.checkpoint):  # a bare save_pretrained directory (e.g. runs/q/sft_base)
        from rlft_ray.learners.lm_learner import evaluate_lm

        cfg = build_config(overrides=["algo=grpo", *args.overrides])
        result = evaluate_lm(args.checkpoint, cfg, opts)
    else:
        saved = load_config_from_checkpoint(args.checkpoint)
        cfg = eval_config(saved, args.overrides)
        from rlft_ray.learners.agent_probe import agent_mode

        # scored by lm.eval_fn (an agent's episodes: by its environment)
        if algorithm_spec(cfg.algo).rollout == "generation" and not agent_mode(cfg):
            print(f"eval: {eval_fn_source(saved, cfg, args.overrides)}", file=sys.stderr)
        result = get_learner_cls(cfg.algo).evaluate(args.checkpoint, cfg, opts)
        if "accuracy" in result and "env" not in result:  # an agent's: the env's is_success
            result["eval_fn"] = cfg.lm.eval_fn
    print(json.dumps(result, indent=2))
    return 0


#: Keys of a checkpoint's config that would import or run code. ``eval`` never takes them
#: from a checkpoint (it may come from anyone): the built-in defaults apply unless the
#: command line sets them; a reward naming a module this package ships is kept.
UNTRUSTED_KEYS = ("lm.trust_remote_code", "lm.reward_fn", "lm.eval_fn")
#: Modules whose reward functions ship with rlft_ray: importing them runs none of a
#: checkpoint's code, so a run's ``lm.eval_fn`` from them is used as the run used it.
BUILT_IN_REWARD_MODULES = ("rlft_ray.rewards", "envs.arithmetic")


def _built_in(spec: object) -> bool:
    module = str(spec).split(":", 1)[0]
    return any(module == m or module.startswith(m + ".") for m in BUILT_IN_REWARD_MODULES)


def eval_config(saved: RunConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's config without its code-running keys, plus the command line's
    overrides. An env id naming a module (``pkg.mod:Env-v0``) would import it: refused
    unless the command line names the env itself."""
    plain = to_dict(saved)
    for key in UNTRUSTED_KEYS:
        section, name = key.split(".")
        if key != "lm.trust_remote_code" and _built_in(plain.get(section, {}).get(name)):
            continue
        plain.get(section, {}).pop(name, None)
    env_id = str(plain.get("env", {}).get("id", ""))
    if ":" in env_id and not any(o.startswith("env.id=") for o in overrides):
        raise ConfigError(
            "env.id",
            f"the checkpoint's env {env_id!r} would import module {env_id.split(':')[0]!r}; "
            f"eval runs no code a checkpoint names: pass env.id={env_id} to allow it",
        )
    return build_config(base=plain, overrides=overrides)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def eval_fn_source(saved: RunConfig, cfg: RunConfig, overrides: list[str]) -> str:
    """Which ``lm.eval_fn`` scores this evaluation, and why (printed by ``rlft-ray eval``)."""
    if any(o.startswith("lm.eval_fn=") for o in overrides):
        return f"lm.eval_fn={cfg.lm.eval_fn} (from the command line)"
    if cfg.lm.eval_fn == saved.lm.eval_fn:
        return f"lm.eval_fn={cfg.lm.eval_fn} (the run's)"
    return (
        f"lm.eval_fn={cfg.lm.eval_fn} (default): the run's {saved.lm.eval_fn} is not built in, "
        f"and eval imports no module a checkpoint names; pass lm.eval_fn={saved.lm.eval_fn} "
        "to use it"
    )
