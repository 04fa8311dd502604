"""The ``rlft-ray`` command line.

Every subcommand validates its input before starting Ray and exits non-zero with
a one-line error naming the cause.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from rlft_ray.config import ConfigError, build_config
from rlft_ray.core.errors import CheckpointError
from rlft_ray.run.ray_session import shutdown_ray
from rlft_ray.run.resources import ResourceError
from rlft_ray.run.startup import default_output_dir, start_early

#: Each verb's handler, imported only when that verb runs (``train`` does not pay for
#: the quickstart's or the sample job's imports).
COMMANDS: dict[str, str] = {
    "train": "rlft_ray.cli:train_command",
    "tune": "rlft_ray.tune.command:command",
    "eval": "rlft_ray.apps.evaluate:command",
    "quickstart": "rlft_ray.apps.quickstart:command",
    "sample": "rlft_ray.apps.sample:command",
    "export": "rlft_ray.apps.export:command",
    "make-tiny-model": "rlft_ray.apps.make_tiny_model:command",
    "make-arith-data": "rlft_ray.apps.make_arith_data:command",
    "make-arith-prefs": "rlft_ray.apps.make_prefs:command",
    "label-samples": "rlft_ray.apps.make_prefs:label_command",
    "make-agent-base": "rlft_ray.apps.make_agent_base:command",
}
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
        "--samples",
        type=int,
        default=0,
        help="LM runs: also sample N completions per prompt and print pass@k and maj@k "
        "(k = 1, 2, 4, ... N)",
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
        "generation config; LoRA adapters merged; no value head or training state), or "
        "a gym policy as an RLlib RLModule checkpoint (--format rllib)",
    )
    x.add_argument("checkpoint", type=Path, help="e.g. runs/g/checkpoint_best")
    x.add_argument(
        "out",
        type=Path,
        help="new directory (loads with from_pretrained; --format rllib: RLModule.from_checkpoint)",
    )
    x.add_argument(
        "--format",
        choices=("hf", "rllib"),
        default="hf",
        help="hf: an LM checkpoint as save_pretrained; rllib: a gym policy (algo ppo / dqn / "
        "filtered_bc) as an RLlib RLModule checkpoint (needs rlft-ray[rllib])",
    )

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

    ab = sub.add_parser(
        "make-agent-base",
        help="a tiny GPT-2 supervised on demonstration episodes of a text environment "
        "(OUT/sft_base: the start of examples/tool_arithmetic_grpo.yaml)",
    )
    ab.add_argument("out", type=Path, help="output directory (e.g. runs/agent)")
    ab.add_argument(
        "--env",
        default="rlft/ToolArithmetic-v0",
        choices=("rlft/ToolArithmetic-v0", "rlft/GuessNumber-v0"),
    )
    ab.add_argument("--demos", type=int, default=400, help="demonstration episodes")
    ab.add_argument("--steps", type=int, default=1500, help="supervised steps (batch 64)")
    ab.add_argument("--seconds", type=float, default=240.0, help="upper bound on the pass")
    ab.add_argument(
        "--tool-frac",
        type=float,
        default=0.5,
        help="ToolArithmetic: share of demonstrations that call the calculator "
        "(the rest answer directly)",
    )
    ab.add_argument("--seed", type=int, default=0)

    d = sub.add_parser(
        "make-arith-data", help="write arith_train.jsonl / arith_test.jsonl prompt files"
    )
    d.add_argument("out", type=Path, help="output directory (e.g. data)")
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--test", type=int, default=200)
    d.add_argument("--kind", choices=("add", "mul", "multi", "mixed"), default="add")
    d.add_argument(
        "--chat",
        action="store_true",
        help="questions for instruct models (chat_arith_*.jsonl: 'What is 49 + 97?')",
    )
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
    pr.add_argument(
        "--format",
        choices=("pairs", "kto"),
        default="pairs",
        help="pairs (prompt/chosen/rejected) or kto (the same completions as unpaired "
        "prompt/completion/label rows)",
    )
    ls = sub.add_parser(
        "label-samples",
        help="KTO rows (prompt/completion/label) from a prompt/completion/reward table "
        "(rlft-ray sample's accepted.jsonl with rsft.select=all)",
    )
    ls.add_argument(
        "samples", type=Path, help=".jsonl/.json/.parquet with prompt, completion, reward"
    )
    ls.add_argument("out", type=Path, help="the KTO file to write (.jsonl)")
    ls.add_argument("--threshold", type=float, default=1.0, help="label = reward >= threshold")
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
        module, function = COMMANDS[args.command].split(":")
        return getattr(importlib.import_module(module), function)(args)
    except (ConfigError, CheckpointError, ResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from rlft_ray.run.driver import RunError, RunInterrupted
        from rlft_ray.run.lock import RunDirBusyError

        if isinstance(exc, RunInterrupted):  # the shell's convention: 128 + signal number
            print(f"error: {exc}", file=sys.stderr)
            return 128 + exc.signum
        if isinstance(exc, (RunError, RunDirBusyError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


def train_command(args: argparse.Namespace) -> int:
    """``rlft-ray train``: the run file plus overrides, run by :func:`~rlft_ray.run.driver.run_training`."""
    cfg = build_config(args.config, args.overrides)
    output_dir = args.output_dir or default_output_dir(Path(args.config).stem)
    start_early(args.own_process, args.address, cfg)
    from rlft_ray.run.driver import run_training

    summary = run_training(
        cfg, output_dir, resume=args.resume, progress=not args.no_progress, address=args.address
    )
    print(json.dumps(summary, indent=2))
    return 0
