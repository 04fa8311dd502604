"""The ``rlft-ray`` command line.

Every subcommand validates its input before starting Ray and exits non-zero with
a one-line error naming the cause.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rlft_ray.config import ConfigError, RunConfig, build_config
from rlft_ray.core.errors import CheckpointError
from rlft_ray.run.resources import ResourceError, shutdown_ray, start_ray_early

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADDRESS_HELP = (
    "Ray cluster to run on (host:port, ray://..., auto); default RAY_ADDRESS, else embedded Ray"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlft-ray",
        description="Distributed RL fine-tuning on Ray: rollout actors + Ray Train learners.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML run file plus dotted key=value overrides")
    t.add_argument("config", help="YAML run file (e.g. examples/cartpole_ppo.yaml)")
    t.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. ppo.lr=3e-4 resources.num_rollout_actors=2",
    )
    t.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="run directory (default: runs/<config>-<time>)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last checkpoint",
    )
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")
    t.add_argument("--address", default=None, help=ADDRESS_HELP)

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint's policy (episodes on its env, or exact-match on a prompt file)",
    )
    e.add_argument(
        "checkpoint",
        type=Path,
        help="checkpoint directory (e.g. runs/a/checkpoint_best) or an LM model directory",
    )
    e.add_argument("--episodes", type=int, default=20)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument(
        "--stochastic", action="store_true", help="sample actions instead of the greedy/mean action"
    )
    e.add_argument(
        "--dataset",
        default=None,
        help="LM runs: prompt file to score greedy completions on (default: lm.eval_prompts)",
    )
    e.add_argument(
        "--limit", type=int, default=None, help="LM runs: score only the first N prompts"
    )
    e.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. env.kwargs.goal=[-0.5,-0.5] or lm.max_new_tokens=16",
    )

    tu = sub.add_parser(
        "tune",
        help="hyperparameter search with Ray Tune from a spec (e.g. tuning/cartpole_ppo_asha.yaml)",
    )
    tu.add_argument(
        "spec",
        type=Path,
        help="tuning spec YAML: run config, search space, scheduler, search algorithm",
    )
    tu.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="search directory (default: runs/tune-<spec>-<time>)",
    )
    tu.add_argument(
        "--resume", action="store_true", help="continue the interrupted search in --output-dir"
    )
    tu.add_argument("--quiet", action="store_true", help="no Tune status tables while it runs")
    tu.add_argument("--address", default=None, help=ADDRESS_HELP)

    sa = sub.add_parser(
        "sample",
        help="rejection sampling over a prompt file: accepted.jsonl/.parquet + summary.json",
    )
    sa.add_argument("config", help="YAML run file (lm.* model/prompts, rsft.* selection rule)")
    sa.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rsft.select=threshold")
    sa.add_argument("--output-dir", type=Path, required=True, help="job directory (empty or new)")
    sa.add_argument("--resume", action="store_true", help="continue a stopped job in --output-dir")
    sa.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    sa.add_argument(
        "--prompts-per-batch",
        type=int,
        default=256,
        help="prompts per actor call and part file: large batches keep the driver's per-batch "
        "work small next to the actors' (generation is still chunked by lm.generation_batch_size)",
    )
    sa.add_argument("--no-progress", action="store_true", help="no progress bar")
    sa.add_argument("--address", default=None, help=ADDRESS_HELP)

    q = sub.add_parser(
        "quickstart",
        help="the main job: tiny LM, SFT base, GRPO on local Ray, before/after table (<= 5 min on 2 cores)",
    )
    q.add_argument("--output-dir", type=Path, default=None)
    q.add_argument(
        "--task",
        choices=("lm", "cartpole"),
        default="lm",
        help="lm (default) or the CartPole PPO flow",
    )
    q.add_argument(
        "--algo",
        choices=("grpo", "rsft"),
        default="grpo",
        help="lm: the RL algorithm after SFT (GRPO, or rejection-sampling fine-tuning)",
    )
    q.add_argument(
        "--seed", type=int, default=0, help="lm: seed of the data, model init, SFT and RL"
    )
    q.add_argument("--sft-steps", type=int, default=1000, help="lm: supervised steps (batch 64)")
    q.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides for examples/arithmetic_grpo.yaml (arithmetic_rsft.yaml with "
        "--algo rsft; cartpole_ppo.yaml with --task cartpole)",
    )

    x = sub.add_parser(
        "export",
        help="an LM checkpoint as a plain save_pretrained directory (weights, tokenizer, "
        "generation config; LoRA adapters merged; no value head or training state)",
    )
    x.add_argument("checkpoint", type=Path, help="e.g. runs/g/checkpoint_best")
    x.add_argument("out", type=Path, help="new directory (loads with from_pretrained)")

    m = sub.add_parser(
        "make-tiny-model",
        help="build a small random GPT-2/Llama/Qwen2 + char tokenizer (save_pretrained)",
    )
    m.add_argument("out", type=Path, help="output directory (e.g. out/tiny-gpt2)")
    m.add_argument("--arch", choices=("gpt2", "llama", "qwen2"), default="gpt2")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--max-positions", type=int, default=128)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true", help="replace an existing directory")

    d = sub.add_parser(
        "make-arith-data", help="write arith_train.jsonl / arith_test.jsonl prompt files"
    )
    d.add_argument("out", type=Path, help="output directory (e.g. data)")
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--test", type=int, default=200)
    d.add_argument("--kind", choices=("add", "mul", "multi", "mixed"), default="add")
    d.add_argument("--max-operand", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser(
        "make-arith-prefs",
        help="preference pairs from a model's own samples, labelled by the arithmetic verifier",
    )
    pr.add_argument("out", type=Path, help="folder with arith_train.jsonl / arith_test.jsonl")
    pr.add_argument("--from", dest="model", required=True, help="the model that samples")
    pr.add_argument("--samples", type=int, default=8, help="completions per prompt")
    pr.add_argument(
        "--pairs-per-prompt",
        type=int,
        default=1,
        help="most pairs per prompt (best vs worst first)",
    )
    pr.add_argument(
        "--name",
        default="arith_prefs",
        help="writes <out>/<name>_train.jsonl and <out>/<name>_test.jsonl",
    )
    pr.add_argument("--temperature", type=float, default=1.0)
    pr.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlft-ray`` / ``python -m rlft_ray``. A command of its own stops Ray
    and ends with ``os._exit`` once its outputs are written: the interpreter's teardown of
    torch and Ray writes nothing and takes 1-1.5 s (an exception takes the normal exit)."""
    if argv is not None:
        return _main(argv)
    code = _main(None)
    shutdown_ray()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    args.own_process = argv is None  # a command of its own (not main([...]) in a caller)
    # overrides may also come after the options (`train cfg.yaml --output-dir d ppo.lr=1e-3`)
    if extra and hasattr(args, "overrides") and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        commands = {
            "train": _train,
            "eval": _eval,
            "quickstart": _quickstart,
            "sample": _sample,
            "tune": _tune,
            "export": _export,
            "make-tiny-model": _make_tiny_model,
            "make-arith-data": _make_arith_data,
            "make-arith-prefs": _make_arith_prefs,
        }
        return commands[args.command](args)
    except (ConfigError, CheckpointError, ResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from rlft_ray.run.driver import RunError, RunInterrupted
        from rlft_ray.run.rundir import RunDirBusyError

        if isinstance(exc, RunInterrupted):  # the shell's convention: 128 + signal number
            print(f"error: {exc}", file=sys.stderr)
            return 128 + exc.signum
        if isinstance(exc, (RunError, RunDirBusyError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def _default_dir(config: Path) -> Path:
    return Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(args: argparse.Namespace) -> int:
    cfg = build_config(args.config, args.overrides)
    output_dir = args.output_dir or _default_dir(Path(args.config))
    _start_early(args, args.address, cfg)
    from rlft_ray.run.driver import run_training

    summary = run_training(
        cfg, output_dir, resume=args.resume, progress=not args.no_progress, address=args.address
    )
    print(json.dumps(summary, indent=2))
    return 0


def _start_early(
    args: argparse.Namespace, address: str | None = None, cfg: RunConfig | None = None
) -> None:
    """A command of its own: local Ray boots while the driver imports and checks the task,
    and the run's start-up breakdown counts from the process start (imports included)."""
    if args.own_process:
        from rlft_ray.learners.registry import GENERATION_MODULE, rollout_module

        preload = rollout_module(cfg) if cfg else GENERATION_MODULE  # LM quickstart: no cfg yet
        start_ray_early(address, cfg.resources if cfg else None, preload)
        from rlft_ray.run.rundir import count_from_process_start  # imports ray.train: after

        count_from_process_start()


def _tune(args: argparse.Namespace) -> int:
    from rlft_ray.tune import format_table, run_search

    if args.resume and args.output_dir is None:
        raise ConfigError("--resume", "needs --output-dir of the search to continue")
    output_dir = (
        args.output_dir or Path("runs") / f"tune-{args.spec.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    result = run_search(
        args.spec,
        output_dir,
        resume=args.resume,
        verbose=0 if args.quiet else 1,
        address=args.address,
    )
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


def _sample(args: argparse.Namespace) -> int:
    from rlft_ray.apps.sample import run_sampling

    cfg = build_config(args.config, args.overrides)
    summary = run_sampling(
        cfg,
        args.output_dir,
        resume=args.resume,
        fmt=args.format,
        prompts_per_batch=args.prompts_per_batch,
        progress=not args.no_progress,
        address=args.address,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    output_dir = args.output_dir or _default_dir(Path("quickstart"))
    if args.task == "lm":
        _start_early(args)  # Ray boots on the core SFT leaves free
        from rlft_ray.apps.quickstart import QuickstartSettings, run_lm_quickstart

        settings = QuickstartSettings(seed=args.seed, sft_steps=args.sft_steps, algo=args.algo)
        summary = run_lm_quickstart(output_dir, args.overrides, settings)
        print(
            f"\nrun directory: {output_dir}  (summary.json, metrics.jsonl, reward_curve.png, checkpoint_best/)"
            f"\nevaluate with: rlft-ray eval {output_dir}/checkpoint_best --dataset {output_dir}/data/arith_test.jsonl"
        )
        return 0 if summary.get("error") is None else 1
    cfg = build_config(EXAMPLES / "cartpole_ppo.yaml", ["stop_return=475", *args.overrides])
    _start_early(args, cfg=cfg)
    from rlft_ray.run.driver import run_training

    summary = run_training(cfg, output_dir, progress=True)
    print(json.dumps(summary, indent=2))
    print(
        f"\nrun directory: {output_dir}\nevaluate with: rlft-ray eval {output_dir}/checkpoint_best --episodes 20"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rlft_ray.learners.checkpoint import load_config_from_checkpoint
    from rlft_ray.learners.base import EvalOptions
    from rlft_ray.learners.registry import get_learner_cls

    if args.episodes < 1:
        raise ConfigError("--episodes", "must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", "must be >= 1")
    opts = EvalOptions(
        episodes=args.episodes,
        seed=args.seed,
        stochastic=args.stochastic,
        dataset=args.dataset,
        limit=args.limit,
    )
    if _is_model_dir(args.checkpoint):  # a bare save_pretrained directory (e.g. runs/q/sft_base)
        from rlft_ray.learners.lm_learner import evaluate_lm

        cfg = build_config(overrides=["algo=grpo", *args.overrides])
        result = evaluate_lm(args.checkpoint, cfg, opts)
    else:
        cfg = _eval_config(load_config_from_checkpoint(args.checkpoint), args.overrides)
        result = get_learner_cls(cfg.algo).evaluate(args.checkpoint, cfg, opts)
    print(json.dumps(result, indent=2))
    return 0


#: Keys of a checkpoint's config that would import or run code. ``eval`` never takes them
#: from a checkpoint (it may come from anyone): the built-in defaults apply unless the
#: command line sets them.
UNTRUSTED_KEYS = ("lm.trust_remote_code", "lm.reward_fn", "lm.eval_fn")


def _eval_config(saved: RunConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's config without its code-running keys, plus the command line's
    overrides. An env id naming a module (``pkg.mod:Env-v0``) would import it: refused
    unless the command line names the env itself."""
    plain = _plain(saved)
    for key in UNTRUSTED_KEYS:
        section, name = key.split(".")
        plain.get(section, {}).pop(name, None)
    env_id = str(plain.get("env", {}).get("id", ""))
    if ":" in env_id and not any(o.startswith("env.id=") for o in overrides):
        raise ConfigError(
            "env.id",
            f"the checkpoint's env {env_id!r} would import module {env_id.split(':')[0]!r}; "
            f"eval runs no code a checkpoint names: pass env.id={env_id} to allow it",
        )
    return build_config(base=plain, overrides=overrides)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def _export(args: argparse.Namespace) -> int:
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.apps.export import export_checkpoint

    quiet_transformers()
    print(json.dumps(export_checkpoint(args.checkpoint, args.out), indent=2))
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.lm.tiny import make_tiny_model

    quiet_transformers()
    try:
        out = make_tiny_model(
            args.out,
            arch=args.arch,
            n_layer=args.layers,
            hidden=args.hidden,
            n_head=args.heads,
            max_positions=args.max_positions,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        raise ConfigError("make-tiny-model", str(exc)) from None
    print(
        f"wrote {args.arch} model + tokenizer to {out} (load with AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def _make_arith_data(args: argparse.Namespace) -> int:
    from envs.arithmetic import write_splits

    if args.train < 1 or args.test < 0:
        raise ConfigError("--train/--test", "need --train >= 1 and --test >= 0 problems")
    try:
        train, test = write_splits(
            args.out,
            args.train,
            args.test,
            kind=args.kind,
            seed=args.seed,
            max_operand=args.max_operand,
        )
    except ValueError as exc:
        raise ConfigError("make-arith-data", str(exc)) from None
    print(f"wrote {args.train} problems to {train} and {args.test} to {test}")
    return 0


def _make_arith_prefs(args: argparse.Namespace) -> int:
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.lm.loading import resolve_model_path
    from rlft_ray.apps.make_prefs import label_pairs

    quiet_transformers()
    cfg = build_config(
        EXAMPLES / "arithmetic_grpo.yaml",
        [f"lm.num_samples={args.samples}", f"lm.temperature={args.temperature}"],
    )
    model = resolve_model_path(str(args.model), "--from")
    for split in ("train", "test"):
        prompts = args.out / f"arith_{split}.jsonl"
        if not prompts.is_file():
            raise ConfigError(
                "make-arith-prefs", f"{prompts} not found (rlft-ray make-arith-data {args.out})"
            )
        out = args.out / f"{args.name}_{split}.jsonl"
        info = label_pairs(
            model, prompts, out, cfg.lm, seed=args.seed, pairs_per_prompt=args.pairs_per_prompt
        )
        print(
            f"wrote {info['pairs']} pairs from {info['prompts']} prompts to {out} ({info['flat_prompts']} prompts had no reward spread)"
        )
    return 0


def _plain(cfg: object) -> dict:
    from rlft_ray.config import to_dict

    return to_dict(cfg)
