"""Preference pairs from a model's own samples, labelled by a reward function.

``rlft-ray make-arith-prefs`` stands in for human feedback on the arithmetic task: the
SFT base samples several completions per prompt, the verifier scores them, and the best
and the worst of each prompt become ``chosen`` and ``rejected`` (prompts whose samples
all score alike give no pair and are counted). Written as jsonl in TRL's fields; with
``--format kto`` as KTO's unpaired rows instead (each pair's chosen completion labelled
desirable, its rejected one undesirable: the same data as the pairs).

``rlft-ray label-samples`` turns any ``prompt`` / ``completion`` / ``reward`` table (the
``accepted.jsonl`` of ``rlft-ray sample`` with ``rsft.select=all``) into KTO's rows:
``label`` is ``reward >= --threshold``.
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
    fmt: str = "pairs",
) -> dict[str, Any]:
    """Sample ``lm.num_samples`` completions per prompt of ``prompts_file`` with ``model``,
    score them with ``lm.reward_fn`` and write pairs to ``out_file``: the best and the
    worst completion of each prompt, and with ``pairs_per_prompt > 1`` further pairs of a
    higher- and a lower-scored distinct completion (best first), up to that many.
    ``fmt="kto"`` writes the pairs' completions as unpaired rows (:func:`unpaired_rows`).

    Returns:
        Counts: ``prompts``, ``pairs``, ``flat_prompts`` (no reward spread), ``file``.
    """
    torch.manual_seed(seed)
    actor = GenerationActor(dataclasses.replace(lm, model=str(model), tokenizer=None), seed=seed)
    table, _ = load_prompts(prompts_file, actor.tokenizer, actor.lm)
    prompts = prompts_from_batch(table)
    pairs, flat = [], 0
    for start in range(0, len(prompts), batch_prompts):
        batch = actor.sample(prompts[start : start + batch_prompts])
        rewards = batch.rewards.reshape(-1, batch.group_size)
        for g in range(len(rewards)):
            rows = _ranked_pairs(batch, g, pairs_per_prompt)
            flat += not rows
            pairs.extend(rows)
    lines = [json.dumps(r) for r in (unpaired_rows(pairs) if fmt == "kto" else pairs)]
    atomic_write_text(Path(out_file), "".join(line + "\n" for line in lines))
    return {
        "prompts": len(prompts),
        "pairs": len(pairs),
        "rows": len(lines),
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


def unpaired_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's rows from pairs: each pair's chosen completion ``label: true``, its rejected one
    ``label: false``; a (prompt, completion) that several pairs share appears once (with the
    label of its first pair, which ranks it best first)."""
    rows, seen = [], set()
    for p in pairs:
        for completion, label in ((p["chosen"], True), (p["rejected"], False)):
            if (p["prompt"], completion) not in seen:
                seen.add((p["prompt"], completion))
                rows.append({"prompt": p["prompt"], "completion": completion, "label": label})
    return rows


def label_samples(src: str | Path, out_file: str | Path, threshold: float) -> dict[str, Any]:
    """KTO's rows from a ``prompt`` / ``completion`` / ``reward`` table: ``label`` is
    ``reward >= threshold``; rows with an empty completion are left out and counted.

    Raises:
        PromptDataError: A row misses a field or its reward is not a finite number.
    """
    from rlft_ray.lm.labelled import _label
    from rlft_ray.lm.prompts import PromptDataError, read_records

    records, lines = read_records(src, "label-samples", what="sample")
    rows, empty = [], 0
    for row, line in zip(records, lines):
        missing = [f for f in ("prompt", "completion", "reward") if row.get(f) is None]
        if missing:
            raise PromptDataError("label-samples", f"{src}:{line}: missing field(s) {missing}")
        reward = _label(row["reward"], "reward", f"{src}:{line}", "label-samples")
        if not str(row["completion"]).strip():
            empty += 1
            continue
        rows.append(
            {"prompt": row["prompt"], "completion": row["completion"], "label": reward >= threshold}
        )
    atomic_write_text(Path(out_file), "".join(json.dumps(r) + "\n" for r in rows))
    desirable = sum(r["label"] for r in rows)
    return {
        "rows": len(rows),
        "desirable": desirable,
        "empty_dropped": empty,
        "file": str(out_file),
    }


def label_command(args: argparse.Namespace) -> int:
    info = label_samples(args.samples, args.out, args.threshold)
    print(
        f"wrote {info['rows']} rows ({info['desirable']} desirable, reward >= {args.threshold}) "
        f"to {info['file']}; {info['empty_dropped']} empty completions left out"
    )
    return 0


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
            model,
            prompts,
            out,
            cfg.lm,
            seed=args.seed,
            pairs_per_prompt=args.pairs_per_prompt,
            fmt=args.format,
        )
        what = f"{info['pairs']} pairs" if args.format == "pairs" else f"{info['rows']} KTO rows"
        print(
            f"wrote {what} from {info['prompts']} prompts to {out} ({info['flat_prompts']} prompts had no reward spread)"
        )
    return 0
