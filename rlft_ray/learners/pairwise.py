"""What every pair learner shares: pair tensors, the chosen+rejected forward, and steps.

DPO, online DPO and the reward model learn from pairs. Each rank may hold a different
number of pairs (online DPO skips prompts whose samples all score alike), so
:func:`pair_steps` counts every minibatch over all ranks, skips one that is empty
everywhere, and lets a rank without pairs run one zero-weight padding pair: every rank
takes the same optimizer steps and DDP's all-reduce always meets. Each micro-batch's
loss is its pairs' summed loss over the minibatch's global pair count (times the world
size, which DDP's averaging divides back out), so micro-batching and DDP give the
gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import TaskProbe
from rlft_ray.learners.ddp import LearnerContext, check_finite, global_sum
from rlft_ray.learners.lm_learner import absolute_paths, check_model, lm_spaces
from rlft_ray.lm.pairs import load_pairs, padding_pair, rows_of

#: Name of the pair dataset handed to Ray Train (``LearnerContext.datasets``).
PAIRS = "pairs"

#: A pair objective: (this micro-batch's pair tensors, per-pair weights [b]) ->
#: (weighted loss summed over the pairs, per-pair statistics [b] to average).
PairLoss = Callable[
    [dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


def pair_steps(
    ctx: LearnerContext,
    net: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    t: dict[str, torch.Tensor],
    pair_loss: PairLoss,
    *,
    pad_id: int,
    num_epochs: int,
    num_minibatches: int,
    micro_batch_size: int,
    max_grad_norm: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """``num_epochs`` passes of ``num_minibatches`` optimizer steps over this rank's pairs.

    Returns:
        The per-pair statistics averaged over every rank's pairs, plus ``loss/grad_norm``,
        ``optim/steps`` and ``optim/grad_accum_steps``.
    """
    sums: dict[str, float] = {}
    pairs, norms, accum = 0.0, [], 0
    for _epoch in range(num_epochs):
        perm = torch.randperm(t["prompt_ids"].shape[0], generator=generator)
        splits = [mb.to(ctx.device) for mb in torch.tensor_split(perm, num_minibatches)]
        counts = torch.tensor([float(len(mb)) for mb in splits], device=ctx.device)
        for mb, size in zip(splits, global_sum(counts, ctx).tolist()):
            if size == 0:
                continue  # empty on every rank: no step anywhere
            micro = list(torch.split(mb, micro_batch_size)) if len(mb) else [None]
            accum = max(accum, len(micro))
            for k, idx in enumerate(micro):
                last = k == len(micro) - 1
                sync = contextlib.nullcontext() if last or ctx.world_size == 1 else net.no_sync()
                with sync:
                    if idx is None:
                        sub, weight = padding_pair(t, pad_id), torch.zeros(1, device=ctx.device)
                    else:
                        sub, weight = rows_of(t, idx), torch.ones(len(idx), device=ctx.device)
                    loss_sum, stats = pair_loss(sub, weight)
                    loss = loss_sum * ctx.world_size / size
                    check_finite("loss/total", loss)
                    loss.backward()
                pairs += float(weight.sum())
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + float((val.detach().float() * weight).sum())
            norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
            check_finite("loss/grad_norm", norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            norms.append(float(norm))
    local = torch.tensor([pairs, *sums.values()], dtype=torch.float64, device=ctx.device)
    total = global_sum(local, ctx).cpu().tolist()
    metrics = {k: v / max(total[0], 1.0) for k, v in zip(sums, total[1:])}
    metrics.update(
        {
            "loss/grad_norm": sum(norms) / max(len(norms), 1),
            "optim/steps": float(len(norms)),
            "optim/grad_accum_steps": float(accum),
        }
    )
    return metrics


def probe_pairs(
    cfg: RunConfig,
    batch_size: int,
    num_epochs: int,
    tables_for: Callable[[Any], dict[str, Any]] = lambda tok: {},
) -> TaskProbe:
    """What every offline pair learner checks before Ray starts: model and tokenizer load,
    ``lm.pairs`` is read, validated and tokenized (decisions counted), the global batch
    splits over the learner ranks, and the run's iterations are the optimizer steps of
    ``num_epochs`` passes over the pairs. ``tables_for(tokenizer)`` gives the small
    tables every rank gets (held-out prompts or pairs).

    Raises:
        ConfigError: Naming the key at fault.
    """
    lm, res = cfg.lm, cfg.resources
    tok, info = check_model(cfg, lm.max_completion_tokens, "lm.max_completion_tokens")
    if not lm.pairs:
        raise ConfigError(
            "lm.pairs",
            f"algo={cfg.algo} needs a preference pair file (prompt, chosen, rejected)",
        )
    if lm.reward_model is not None:
        raise ConfigError("lm.reward_model", f"algo={cfg.algo} learns from lm.pairs; unset it")
    key = f"{cfg.algo}.batch_size"
    if batch_size % res.num_learners:
        raise ConfigError(
            key, f"{batch_size} pairs cannot be split evenly over {res.num_learners} learners"
        )
    table, stats = load_pairs(lm.pairs, tok, lm)
    if stats.kept < batch_size:
        raise ConfigError(
            key, f"is {batch_size} but only {stats.kept} usable pairs are in {lm.pairs}"
        )
    # num_epochs is the budget (or total_iterations when smaller); every pair is an "env
    # step", so the step budget must not cut the epochs short
    steps = math.ceil(num_epochs * stats.kept / batch_size)
    steps = min(steps, cfg.total_iterations or steps)
    run = dataclasses.replace(
        absolute_paths(cfg), total_iterations=steps, total_env_steps=steps * batch_size
    )
    return TaskProbe(
        spaces=lm_spaces(cfg, tok),
        datasets={PAIRS: table},
        tables=tables_for(tok),
        info={**info, **stats.as_dict()},
        cfg=run,
    )
