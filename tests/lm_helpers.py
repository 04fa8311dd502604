"""Helpers the LM learner tests share: real sampled batches, slicing, first-step gradients."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlft_ray.config import LMConfig, build_config
from rlft_ray.learners.base import LearnerContext
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.types import GenerationBatch, Prompt

GROUP = 4


def make_batch(model_dir: Path, n_prompts: int = 4, seed: int = 0) -> GenerationBatch:
    """Real sampled completions (consistent log-probs) with fixed 0/1 rewards."""
    actor = GenerationActor(
        LMConfig(model=str(model_dir), num_samples=GROUP, max_new_tokens=5), seed=seed
    )
    texts = ["1+2=", "12+34=", "5+7=", "40+40=", "9+9=", "3+30="][:n_prompts]
    batch = actor.generate(
        [Prompt(t, actor.tokenizer(t)["input_ids"], {"answer": "3"}) for t in texts]
    )
    batch.rewards = np.random.default_rng(seed).integers(0, 2, len(batch)).astype(np.float32)
    batch.rewards[:GROUP] = 1.0  # one group without signal
    return batch


def spread_reward(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """A reward with a spread over a random model's completions: the text's code points mod 5."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def make_learner(algo: str, model_dir: Path, *overrides: str, rank: int = 0, world: int = 1):
    cfg = build_config(
        overrides=[f"algo={algo}", f"lm.model={model_dir}", f"{algo}.optim.lr=1e-3", *overrides]
    )
    return get_learner_cls(algo)(cfg, None, LearnerContext(rank, world))


def slice_batch(batch: GenerationBatch, rows: slice) -> GenerationBatch:
    arrays = {
        k: getattr(batch, k)[rows]
        for k in (
            "prompt_ids",
            "prompt_mask",
            "response_ids",
            "response_mask",
            "logprobs",
            "rewards",
            "group_ids",
        )
    }
    lists = {k: getattr(batch, k)[rows] for k in ("prompts", "completions", "metadata")}
    return GenerationBatch(
        **arrays,
        **lists,
        policy_version=batch.policy_version,
        group_size=batch.group_size,
        pad_token_id=batch.pad_token_id,
    )


def first_step_grads(learner, batch: Any) -> dict[str, torch.Tensor]:
    """Gradients the optimizer sees at its first step of ``learner.update(batch)``."""
    module = learner.core.policy if hasattr(learner, "core") else learner.model
    params = dict(module.named_parameters())
    if getattr(learner, "own_head", False):  # a reward model's untied LM head (sft_coef)
        params.update({f"lm_head.{n}": p for n, p in learner.lm_head.named_parameters()})
    seen: dict[str, torch.Tensor] = {}
    step = learner.optimizer.step

    def capture(*args, **kwargs):
        if not seen:
            seen.update(
                {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            )
        return step(*args, **kwargs)

    learner.optimizer.step = capture
    learner.update(batch, progress=0.0)
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FrameShard:
    """A pandas table standing in for a Ray Data shard (``iter_batches`` of numpy columns)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def iter_batches(self, batch_size: int, drop_last: bool = True, **shuffle: Any) -> Any:
        seed = shuffle.get("local_shuffle_seed")
        table = self.table.sample(frac=1, random_state=seed) if seed is not None else self.table
        stop = len(table) - batch_size + 1 if drop_last else len(table)
        for i in range(0, max(stop, 0), batch_size):
            rows = table.iloc[i : i + batch_size]
            yield {c: rows[c].to_numpy() for c in rows.columns}


def generate_with_drawing_recorder(actor, prompts, n: int, temperature: float):
    """``generate`` with the actor's drawing recorder, each prompt ``n`` times, raw logits and
    the scores generate took its argmax over kept; checks that the recorded log-probs are
    log softmax(logits / T) of the drawn tokens. Returns ``(tokens, real, scores)``."""
    from transformers import LogitsProcessorList

    config = actor._generation_config(greedy=False, max_new_tokens=actor.lm.max_new_tokens)
    config.output_scores = True  # the scores generate took its argmax over
    config.output_logits = True  # the raw logits
    recorder = actor._recorder(greedy=False)
    width = max(len(p.ids) for p in prompts)
    ids = torch.tensor([[actor.pad_id] * (width - len(p.ids)) + p.ids for p in prompts])
    ids = ids.repeat_interleave(n, 0)
    out = actor.model.generate(
        input_ids=ids,
        attention_mask=(ids != actor.pad_id).long(),
        generation_config=config,
        logits_processor=LogitsProcessorList([recorder]),
    )
    tokens, real, recorded = actor._real_tokens(out.sequences[:, width:], recorder)
    raw = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)
    want = raw.gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(recorded[real], want[real], atol=1e-5, rtol=1e-5)
    return tokens, real, torch.stack(out.scores, 1)
