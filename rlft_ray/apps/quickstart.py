"""The LM quickstart: tiny GPT-2 -> SFT on a few demonstrations -> GRPO (or RSFT) with a verifier.

The story is the usual one for RL with verifiable rewards: labelled
demonstrations are scarce (the supervised pass sees 300 solved problems), prompts
with a checkable answer are plentiful (RL samples from thousands). Steps:

1. write train/test splits of 2-digit addition (``data/``);
2. build a randomly initialised tiny GPT-2 + character tokenizer (``base_init/``);
3. supervised fine-tuning on the demonstrations (about a minute on 2 cores) ->
   the "pretrained" model (``sft_base/``), and its greedy exact-match on the test split;
4. GRPO through the regular training path (generation actors + Ray Train learner,
   ``examples/arithmetic_grpo.yaml``) into the same directory; or, with ``--algo rsft``,
   rejection-sampling fine-tuning (``examples/arithmetic_rsft.yaml``);
5. exact-match of the final checkpoint, a before/after table, ``summary.json``
   (``accuracy_before``, ``accuracy_after``, ``wall_s``, ...) and ``reward_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft_ray.apps import EXAMPLES
from rlft_ray.config import build_config
from rlft_ray.run.startup import default_output_dir, start_early


@dataclass(frozen=True)
class QuickstartSettings:
    """Knobs of the quickstart outside the run config.

    Attributes:
        n_train: RL prompts (2-digit additions with answers for the verifier).
        n_test: Held-out problems for exact-match.
        n_demos: Solved problems the supervised pass trains on (first of the train split).
        sft_steps: Supervised steps (batch 64); ``sft_max_seconds`` caps the time.
        sft_max_seconds: Upper bound on the supervised pass, far above what it takes
            (about 20 s on 2 quiet cores): a cap near that made a loaded machine's base
            weaker (365 of 1000 steps at 90 s), so results depended on the load.
        sft_lr: Supervised learning rate.
        arch, n_layer, hidden, n_head: The tiny model.
        seed: Data, model init and SFT seed.
        algo: The RL step: ``grpo`` (examples/arithmetic_grpo.yaml) or ``rsft``
            (rejection-sampling fine-tuning, examples/arithmetic_rsft.yaml).
    """

    n_train: int = 4000
    n_test: int = 200
    n_demos: int = 300
    sft_steps: int = 1000
    sft_max_seconds: float = 900.0
    sft_lr: float = 3e-3
    arch: str = "gpt2"
    n_layer: int = 2
    hidden: int = 64
    n_head: int = 4
    seed: int = 0
    algo: str = "grpo"


def run_lm_quickstart(
    output_dir: str | Path,
    overrides: Sequence[str] = (),
    settings: QuickstartSettings | None = None,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the whole quickstart into ``output_dir``; returns the final ``summary.json``.

    Args:
        output_dir: Fresh directory for data, models, the RL run and the summary.
        overrides: Dotted overrides for ``examples/arithmetic_grpo.yaml`` (the RL run).
        settings: Data / model / SFT sizes.
        progress: Live progress bar during RL.
        log: Where progress lines go.
    """
    import torch

    from envs.arithmetic import write_splits
    from rlft_ray.core.fileio import atomic_write_json
    from rlft_ray.core.torch_utils import seed_everything
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.rollout.evaluate import evaluate_model
    from rlft_ray.run.driver import RunError, run_training

    quiet_transformers()
    s = settings or QuickstartSettings()
    out = Path(output_dir).resolve()
    if (out / "config.yaml").exists():
        raise RunError(f"{out} already holds a run; choose another --output-dir")
    started = time.perf_counter()
    seed_everything(s.seed)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves a core free

    data = out / "data"
    # a bad override fails now, before any file is written (not after SFT)
    cfg = _rl_config(out, data / "arith_train.jsonl", data / "arith_test.jsonl", s, overrides)
    train_path, test_path = write_splits(data, s.n_train, s.n_test, kind="add", seed=s.seed)
    demos = [json.loads(line) for line in train_path.read_text().splitlines()[: s.n_demos]]
    sft = build_sft_base(out, demos, s, log)
    before = evaluate_model(out / "sft_base", test_path, cfg.lm)
    log(
        f"      SFT base exact-match on {before['num_prompts']} held-out problems: {before['accuracy']:.1%}"
    )

    log(
        f"[3/4] {s.algo.upper()}: {cfg.resources.num_rollout_actors} generation actors + {cfg.resources.num_learners} Ray Train learner, {cfg.total_iterations or cfg.rsft.rounds} iterations"
    )
    rl_start = time.perf_counter()
    summary = run_training(cfg, out, progress=progress)
    rl_s = time.perf_counter() - rl_start

    log("[4/4] evaluating the RL checkpoint")
    after = evaluate_model(out / "checkpoint_last" / "policy", test_path, cfg.lm)
    summary.update(
        {
            "task": "arithmetic-add (2-digit)",
            "rl_algo": s.algo,
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "accuracy_gain": after["accuracy"] - before["accuracy"],
            "eval_problems": after["num_prompts"],
            "sft_steps": int(sft["steps"]),
            "sft_demos": len(demos),
            "sft_s": round(sft["seconds"], 2),
            "rl_s": round(rl_s, 2),
            "rl_wall_s": summary["wall_s"],
            "wall_s": round(time.perf_counter() - started, 2),
            "sft_base": str(out / "sft_base"),
            "examples_after": after["examples"],
        }
    )
    atomic_write_json(out / "summary.json", summary)
    log(format_table(summary))
    return summary


def _rl_config(
    out: Path, train_path: Path, test_path: Path, s: QuickstartSettings, overrides: Sequence[str]
) -> Any:
    """The RL run's config: ``examples/arithmetic_{algo}.yaml`` on this quickstart's files."""
    from rlft_ray.config import ConfigError, build_config

    example = EXAMPLES / f"arithmetic_{s.algo}.yaml"
    if s.algo not in ("grpo", "rsft"):
        raise ConfigError("--algo", f"the LM quickstart runs grpo or rsft, not {s.algo!r}")
    return build_config(
        example,
        [
            f"lm.model={out / 'sft_base'}",
            f"lm.prompts={train_path}",
            f"lm.eval_prompts={test_path}",
            f"seed={s.seed}",
            *overrides,
        ],
    )


def build_sft_base(
    out: Path, demos: list[dict[str, Any]], s: QuickstartSettings, log: Any = print
) -> dict[str, float]:
    """Steps 1-2: a random tiny model in ``out/base_init``, supervised-fine-tuned on
    ``demos`` into ``out/sft_base`` (the "pretrained" model RL starts from).

    Returns:
        The SFT pass's statistics (``steps``, ``loss``, ``seconds``, ``examples``).
    """
    from rlft_ray.lm.loading import load_model_and_tokenizer
    from rlft_ray.lm.sft import supervised_finetune
    from rlft_ray.lm.tiny import make_tiny_model

    log(
        f"[1/4] tiny {s.arch} ({s.n_layer} layers, hidden {s.hidden}) + char tokenizer -> {out / 'base_init'}"
    )
    make_tiny_model(
        out / "base_init",
        arch=s.arch,
        n_layer=s.n_layer,
        hidden=s.hidden,
        n_head=s.n_head,
        max_positions=64,
        seed=s.seed,
    )
    model, tokenizer = load_model_and_tokenizer(out / "base_init")
    log(
        f"[2/4] supervised fine-tuning on {len(demos)} solved problems ({s.sft_steps} steps, <= {s.sft_max_seconds:.0f} s)"
    )
    sft = supervised_finetune(
        model,
        tokenizer,
        demos,
        seconds=s.sft_max_seconds,
        max_steps=s.sft_steps,
        lr=s.sft_lr,
        seed=s.seed,
        on_log=lambda d: log(
            f"      step {d['step']:.0f}  loss {d['loss']:.3f}  {d['seconds']:.0f} s"
        ),
    )
    if sft["steps"] < s.sft_steps:
        log(
            f"      the supervised pass stopped at {s.sft_max_seconds:.0f} s after "
            f"{sft['steps']:.0f} of {s.sft_steps} steps: this base is weaker than usual"
        )
    model.save_pretrained(out / "sft_base")
    tokenizer.save_pretrained(out / "sft_base")
    return sft


def format_table(summary: dict[str, Any]) -> str:
    """The before/after table printed at the end."""
    rows = [
        ("SFT base (before RL)", summary["accuracy_before"]),
        (f"after {summary.get('rl_algo', 'grpo').upper()}", summary["accuracy_after"]),
    ]
    lines = [
        f"exact-match on {summary['eval_problems']} held-out 2-digit additions (greedy):",
        f"  {'model':<22} {'accuracy':>9}",
    ]
    lines += [f"  {name:<22} {acc:>9.1%}" for name, acc in rows]
    lines.append(f"  {'gain':<22} {summary['accuracy_gain'] * 100:>+8.1f} pts")
    lines.append(
        f"SFT {summary['sft_s']:.0f} s ({summary['sft_steps']} steps), RL {summary['rl_s']:.0f} s "
        f"({summary['iterations']} iterations), total {summary['wall_s']:.0f} s"
    )
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    output_dir = args.output_dir or default_output_dir("quickstart")
    if args.task == "lm":
        start_early(args.own_process)  # Ray boots on the core SFT leaves free

        settings = QuickstartSettings(seed=args.seed, sft_steps=args.sft_steps, algo=args.algo)
        summary = run_lm_quickstart(output_dir, args.overrides, settings)
        print(
            f"\nrun directory: {output_dir}  (summary.json, metrics.jsonl, reward_curve.png, checkpoint_best/)"
            f"\nevaluate with: rlft-ray eval {output_dir}/checkpoint_best --dataset {output_dir}/data/arith_test.jsonl"
        )
        return 0 if summary.get("error") is None else 1
    cfg = build_config(EXAMPLES / "cartpole_ppo.yaml", ["stop_return=475", *args.overrides])
    start_early(args.own_process, cfg=cfg)
    from rlft_ray.run.driver import run_training

    summary = run_training(cfg, output_dir, progress=True)
    print(json.dumps(summary, indent=2))
    print(
        f"\nrun directory: {output_dir}\nevaluate with: rlft-ray eval {output_dir}/checkpoint_best --episodes 20"
    )
    return 0
