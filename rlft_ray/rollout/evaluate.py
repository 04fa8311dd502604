"""Greedy evaluation of a causal LM on a prompt file (``rlft-ray eval --dataset``, quickstart)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from rlft_ray.config import LMConfig, LoRAConfig


def evaluate_model(
    model_dir: str | Path,
    dataset: str | Path,
    lm: LMConfig,
    limit: int | None = None,
    seed: int = 0,
    num_threads: int = 1,
    examples: int = 3,
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

    Returns:
        ``{"dataset", "num_prompts", "accuracy", "completion_tokens_mean", "examples",
        "data/..."}`` where accuracy is the mean of ``lm.eval_fn`` (exact match by default).
    """
    from rlft_ray.lm.prompts import load_prompts, prompts_from_batch
    from rlft_ray.rollout.generation import GenerationActor

    # a LoRA checkpoint's policy/ loads merged (hf) or as vLLM LoRA adapters on its base
    # (vllm): no new adapters on top of it
    lm = dataclasses.replace(lm, model=str(model_dir), tokenizer=None, lora=LoRAConfig())
    actor = GenerationActor(lm, seed=seed, num_threads=num_threads)
    try:
        table, stats = load_prompts(dataset, actor.tokenizer, lm, key="--dataset")
        prompts = prompts_from_batch(table)
        if limit is not None:
            prompts = prompts[:limit]
        batch, scores = actor.evaluate(prompts)
    finally:
        actor.close()  # a vLLM engine's KV cache goes now, not at exit
    return {
        "dataset": str(dataset),
        "num_prompts": len(prompts),
        "accuracy": float(np.mean(scores)) if len(scores) else 0.0,
        "completion_tokens_mean": float(batch.response_mask.sum(1).mean()) if len(batch) else 0.0,
        "examples": [
            {"prompt": p.text, "completion": c, "answer": p.metadata.get("answer")}
            for p, c in zip(prompts[:examples], batch.completions[:examples])
        ],
        **{k: v for k, v in stats.as_dict().items() if k != "data/source"},
    }
