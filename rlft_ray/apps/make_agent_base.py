"""``rlft-ray make-agent-base``: a tiny model that has seen a text environment's turn format.

Like the quickstart's arithmetic base: a randomly initialised tiny GPT-2 with the
character tokenizer, supervised-fine-tuned on a few hundred demonstration episodes of the
environment (``envs.<module>:demonstrations``; model turns carry the loss, the
environment's replies do not), into ``OUT/sft_base``: the starting point of
``examples/tool_arithmetic_grpo.yaml`` and ``benchmarks/agent_tools.py``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from rlft_ray.config import ConfigError

#: Environments that ship demonstrations: id -> ``module:function(n, seed, **kwargs)``.
DEMONSTRATIONS: dict[str, str] = {
    "rlft/ToolArithmetic-v0": "envs.tool_arithmetic:demonstrations",
    "rlft/GuessNumber-v0": "envs.guess_number:demonstrations",
}


def build_agent_base(
    out: str | Path,
    env_id: str,
    demos: int = 400,
    steps: int = 1500,
    seconds: float = 240.0,
    seed: int = 0,
    demo_kwargs: dict[str, Any] | None = None,
    n_layer: int = 2,
    hidden: int = 64,
    log: Any = print,
) -> dict[str, float]:
    """Write ``out/base_init`` (random) and ``out/sft_base`` (after the supervised pass).

    Returns:
        The supervised pass's statistics (``steps``, ``loss``, ``seconds``, ``examples``).

    Raises:
        ConfigError: ``env_id`` ships no demonstrations.
    """
    import torch

    from rlft_ray.core.torch_utils import seed_everything
    from rlft_ray.lm.loading import load_model_and_tokenizer
    from rlft_ray.lm.sft import supervised_finetune
    from rlft_ray.lm.tiny import make_tiny_model

    if env_id not in DEMONSTRATIONS:
        raise ConfigError(
            "--env", f"{env_id} ships no demonstrations (one of {sorted(DEMONSTRATIONS)})"
        )
    module, name = DEMONSTRATIONS[env_id].split(":")
    rows = getattr(importlib.import_module(module), name)(demos, seed=seed, **(demo_kwargs or {}))
    out = Path(out)
    seed_everything(seed)
    torch.set_num_threads(1)
    make_tiny_model(
        out / "base_init", n_layer=n_layer, hidden=hidden, n_head=4, max_positions=128, seed=seed
    )
    model, tokenizer = load_model_and_tokenizer(out / "base_init")
    stats = supervised_finetune(
        model,
        tokenizer,
        rows,
        seconds=seconds,
        max_steps=steps,
        seed=seed,
        on_log=lambda d: log(f"step {d['step']:.0f}  loss {d['loss']:.3f}  {d['seconds']:.0f} s"),
    )
    model.save_pretrained(out / "sft_base")
    tokenizer.save_pretrained(out / "sft_base")
    return stats


def command(args: argparse.Namespace) -> int:
    from rlft_ray.lm import quiet_transformers

    quiet_transformers()
    kwargs = {"tool_frac": args.tool_frac} if args.env == "rlft/ToolArithmetic-v0" else {}
    stats = build_agent_base(
        args.out, args.env, args.demos, args.steps, args.seconds, args.seed, kwargs
    )
    print(
        f"wrote {args.out}/sft_base: {stats['steps']:.0f} supervised steps on {args.demos} "
        f"{args.env} demonstrations in {stats['seconds']:.0f} s (loss {stats['loss']:.3f})"
    )
    return 0
