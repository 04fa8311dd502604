"""Preference pairs from a model's own samples, labelled by a reward function.

``rlft-ray make-arith-prefs`` stands in for human feedback on the arithmetic task: the
SFT base samples several completions per prompt, the verifier scores them, and the best
and the worst of each prompt become ``chosen`` and ``rejected`` (prompts whose samples
all score alike give no pair and are counted). Written as jsonl in TRL's fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from rlft_ray.apps import EXAMPLES
from rlft_ray.config import ConfigError, LMConfig, build_config
from rlft_ray.core.fileio import atomic_write_text
from rlft_ray.lm.prompts import load_prompts, prompts_from_batch
from rlft_ray.rollout.generation import GenerationActor


def label_pairs(
    model: str | Path,
    prompts_file: str | Path,
    out_file: str | Path,
    lm: LMConfig,
    seed: int = 0,
    batch_prompts: int = 64,
    pairs_per_prompt: int = 1,
) -> dict[str, Any]:
    """Sample ``lm.num_samples`` completions per prompt of ``prompts_file`` with ``model``,
    score them with ``lm.reward_fn`` and write pairs to ``out_file``: the best and the
    worst completion of each prompt, and with ``pairs_per_prompt > 1`` further pairs of a
    higher- and a lower-scored distinct completion (best first), up to that many.

    Returns:
        Counts: ``prompts``, ``pairs``, ``flat_prompts`` (no reward spread), ``file``.
    """
    torch.manual_seed(seed)
    actor = GenerationActor(dataclasses.replace(lm, model=str(model), tokenizer=None), seed=seed)
    table, _ = load_prompts(prompts_file, actor.tokenizer, actor.lm)
    prompts = prompts_from_batch(table)
    lines, flat = [], 0
    for start in range(0, len(prompts), batch_prompts):
        batch = actor.sample(prompts[start : start + batch_prompts])
        rewards = batch.rewards.reshape(-1, batch.group_size)
        for g in range(len(rewards)):
            rows = _ranked_pairs(batch, g, pairs_per_prompt)
            flat += not rows
            lines.extend(json.dumps(r) for r in rows)
    atomic_write_text(Path(out_file), "".join(line + "\n" for line in lines))
    return {
        "prompts": len(prompts),
        "pairs": len(lines),
        "flat_prompts": flat,
        "file": str(out_file),
    }


def _ranked_pairs(batch: Any, group: int, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` pairs (higher-scored, lower-scored) of distinct completions of one
    prompt, the best against the worst first; none when the scores do not differ."""
    n = batch.group_size
    rows = range(group * n, (group + 1) * n)
    seen: dict[str, int] = {}
    for i in rows:  # one sample per distinct, non-empty completion text
        if batch.completions[i].strip():
            seen.setdefault(batch.completions[i], i)
    order = sorted(seen.values(), key=lambda i: -float(batch.rewards[i]))
    pairs = [
        (hi, lo)
        for k, hi in enumerate(order)
        for lo in reversed(order[k + 1 :])
        if batch.rewards[hi] > batch.rewards[lo]
    ]
    return [
        {
            "prompt": batch.prompts[hi],
            "chosen": batch.completions[hi],
            "rejected": batch.completions[lo],
            "score_chosen": float(batch.rewards[hi]),
            "score_rejected": float(batch.rewards[lo]),
        }
        for hi, lo in pairs[:limit]
    ]


def command(args: argparse.Namespace) -> int:
    from rlft_ray.apps.make_prefs import label_pairs
    from rlft_ray.lm import quiet_transformers
    from rlft_ray.lm.loading import resolve_model_path

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
