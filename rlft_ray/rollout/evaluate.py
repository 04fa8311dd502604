"""Greedy evaluation of a causal LM on a prompt file (``rlft-ray eval --dataset``, quickstart),
or of an LM agent on held-out episodes of a text environment."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlft_ray.config import EnvConfig, LMConfig, LoRAConfig
from rlft_ray.types import Prompt


def evaluate_model(
    model_dir: str | Path,
    dataset: str | Path,
    lm: LMConfig,
    limit: int | None = None,
    seed: int = 0,
    num_threads: int = 1,
    examples: int = 3,
    samples: int = 0,
) -> dict[str, Any]:
    """Score greedy completions of ``model_dir`` on ``dataset`` with ``lm.eval_fn``.

    Uses the same generation code as the training actors (in this process, no Ray),
    and the same prompt rules (chat template, length limit, overflow policy).

    Args:
        model_dir: A ``save_pretrained`` directory (a checkpoint's ``policy/``) or hub id.
        dataset: Prompt file (``.jsonl`` / ``.parquet``) with answers.
        lm: The run's ``lm`` section (its ``model``/``tokenizer`` are replaced by ``model_dir``).
        limit: Score only the first ``limit`` prompts.
        seed: Seeds torch (greedy decoding does not sample; kept for symmetry).
        num_threads: torch threads.
        examples: How many (prompt, completion, answer) triples to include.
        samples: Also sample this many completions per prompt (at ``lm.temperature``) and
            report ``pass@k`` and ``maj@k`` for k = 1, 2, 4, ... up to it; 0: greedy only.

    Returns:
        ``{"dataset", "num_prompts", "accuracy", "completion_tokens_mean", "examples",
        "data/...", "pass@k", "maj@k"}`` where accuracy is the mean of ``lm.eval_fn`` (exact match by default).
    """
    from rlft_ray.lm.prompts import load_prompts, prompts_from_batch
    from rlft_ray.rollout.generation import GenerationActor

    # a LoRA checkpoint's policy/ loads merged: no adapters on top of it
    lm = dataclasses.replace(lm, model=str(model_dir), tokenizer=None, lora=LoRAConfig())
    actor = GenerationActor(lm, seed=seed, num_threads=num_threads)
    table, stats = load_prompts(dataset, actor.tokenizer, lm, key="--dataset")
    prompts = prompts_from_batch(table)
    if limit is not None:
        prompts = prompts[:limit]
    batch, scores = actor.evaluate(prompts)
    sampled: dict[str, float] = {}
    if samples > 0:
        from rlft_ray.algorithms.pass_at_k import sample_metrics

        correct, answers = actor.sample_scores(prompts, samples)
        sampled = {"samples": samples, **sample_metrics(answers.tolist(), correct)}
    return {
        "dataset": str(dataset),
        "num_prompts": len(prompts),
        "accuracy": float(np.mean(scores)) if len(scores) else 0.0,
        "completion_tokens_mean": float(batch.response_mask.sum(1).mean()) if len(batch) else 0.0,
        "examples": [
            {"prompt": p.text, "completion": c, "answer": p.metadata.get("answer")}
            for p, c in zip(prompts[:examples], batch.completions[:examples])
        ],
        **sampled,
        **{k: v for k, v in stats.as_dict().items() if k != "data/source"},
    }


def seed_prompts(seeds: Sequence[int]) -> list[Prompt]:
    """Reset seeds of a text environment as the prompts a generation actor plays from."""
    return [Prompt(text="", ids=[], metadata={"seed": int(s)}) for s in seeds]


def evaluate_agent(
    model_dir: str | Path,
    lm: LMConfig,
    env: EnvConfig,
    seeds: Sequence[int],
    num_threads: int = 1,
    examples: int = 3,
) -> dict[str, Any]:
    """Greedy multi-turn episodes of ``model_dir`` in the text environment ``env``, one per
    reset seed, with the same rollout code as the training actors (this process, no Ray).

    Returns:
        ``{"env", "episodes", "accuracy" (solved fraction, info["is_success"]),
        "return_mean", "turns_mean", "tool_calls_mean", "truncated_frac", "examples"}``.
    """
    from rlft_ray.rollout.generation import GenerationActor
    from rlft_ray.rollout.multiturn import play

    lm = dataclasses.replace(lm, model=str(model_dir), tokenizer=None, lora=LoRAConfig())
    actor = GenerationActor(lm, num_threads=num_threads, env=env)
    batch = play(actor, seed_prompts(seeds), greedy=True)
    stats = batch.agent
    metrics = stats.metrics()
    return {
        "env": env.id,
        "episodes": len(stats),
        "accuracy": float(stats.success.mean()) if len(stats) else 0.0,
        "return_mean": float(stats.returns.mean()) if len(stats) else 0.0,
        "turns_mean": metrics["rollout/turns_mean"],
        "tool_calls_mean": metrics["rollout/tool_calls_mean"],
        "truncated_frac": metrics["rollout/truncated_frac"],
        "examples": [
            {"prompt": p, "episode": c, "return": float(r)}
            for p, c, r in list(zip(batch.prompts, batch.completions, batch.rewards))[:examples]
        ],
    }
