"""A small supervised fine-tuning pass (the quickstart's "pretraining" of its tiny model).

Next-token cross-entropy on ``prompt + answer + eos`` with the loss on the answer
and EOS tokens only (multi-turn demonstrations: on the model's turns only), AdamW, random minibatches, for a time or step budget.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlft_ray.core.torch_utils import fused_optimizer

IGNORE = -100


def _encode(
    rows: Sequence[dict[str, Any]], tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt tokens ignored)."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        if "segments" in row:  # a multi-turn demonstration
            seq, lab = _segments(prompt, row["segments"], tokenizer)
            seqs.append(seq)
            labels.append(lab)
            continue
        answer = tokenizer(str(row["answer"]))["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return ids, mask, lab


def _segments(
    prompt: list[int], segments: Sequence[tuple[str, bool]], tokenizer: Any
) -> tuple[list[int], list[int]]:
    """A multi-turn demonstration as the agent rollout lays it out: each model turn
    (``trained``) is its tokens + EOS and carries the loss; each environment reply is its
    tokens (encoded without special tokens, as the rollout encodes them), no loss."""
    seq, lab = list(prompt), [IGNORE] * len(prompt)
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            ids = [*ids, tokenizer.eos_token_id]
        seq += ids
        lab += ids if trained else [IGNORE] * len(ids)
    return seq, lab


def supervised_finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    seconds: float = 60.0,
    max_steps: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    on_log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 200,
) -> dict[str, float]:
    """Train ``model`` in place on ``(prompt, answer)`` rows until the time or step budget ends.

    Args:
        model: A causal LM (``labels=`` computes the shifted cross-entropy).
        tokenizer: Its tokenizer (needs ``eos_token_id`` and ``pad_token_id``).
        rows: Dicts with ``prompt`` and ``answer``, or ``prompt`` and ``segments``: a
            multi-turn demonstration, ``[(text, is_model_turn), ...]`` (model turns end
            with EOS and carry the loss, environment replies do not).
        seconds: Wall-clock budget.
        max_steps: Optional step budget (whichever ends first).
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warmup, then cosine to 10 % over the budget).
        warmup_steps: Warmup length.
        seed: Minibatch sampling seed.
        on_log: Called every ``log_every`` steps with ``{"step", "loss", "seconds"}``.
        log_every: Logging interval in steps.

    Returns:
        ``{"steps", "loss", "seconds", "examples"}``.
    """
    if not rows:
        raise ValueError("supervised_finetune needs at least one (prompt, answer) row")
    ids, mask, labels = _encode(rows, tokenizer)
    rng = random.Random(seed)
    opt = fused_optimizer(torch.optim.AdamW, model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    step, loss_ema = 0, math.nan
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or (max_steps is not None and step >= max_steps):
            break
        frac = min(1.0, elapsed / seconds) if max_steps is None else step / max_steps
        scale = min(1.0, (step + 1) / warmup_steps) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.tensor(rng.sample(range(len(rows)), min(batch_size, len(rows))))
        width = int(mask[idx].sum(1).max())
        loss = model(
            input_ids=ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width]
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        if on_log is not None and step % log_every == 0:
            on_log({"step": step, "loss": loss_ema, "seconds": time.perf_counter() - start})
    model.eval()
    return {
        "steps": float(step),
        "loss": loss_ema,
        "seconds": time.perf_counter() - start,
        "examples": float(step * min(batch_size, len(rows))),
    }
