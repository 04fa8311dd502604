"""What every pair learner shares: the pair objective's step through the engine, and the probe.

DPO, online DPO and the reward model learn from pairs. Each rank may hold a different
number of pairs (online DPO skips prompts whose samples all score alike); the step
engine (:mod:`rlft_ray.learners.engine`) counts every minibatch over all ranks, and
:func:`pair_update` gives it a pair objective: each micro-batch's loss is its pairs'
summed loss over the minibatch's global pair count, so micro-batching and DDP give the
gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import TaskProbe
from rlft_ray.learners.ddp import LearnerContext
from rlft_ray.learners.engine import MicroOut, StepEngine, Steps
from rlft_ray.learners.lm_learner import absolute_paths, check_model, heldout_tables, lm_spaces
from rlft_ray.lm.labelled import load_labelled
from rlft_ray.lm.pairs import load_pairs, padding_pair, rows_of
from rlft_ray.lm.prompts import ShardStream

#: Name of the pair dataset handed to Ray Train (``LearnerContext.datasets``).
PAIRS = "pairs"

#: A pair objective: (this micro-batch's pair tensors, per-pair weights [b]) ->
#: (weighted loss summed over the pairs, per-pair statistics [b] to average).
PairLoss = Callable[
    [dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


def pair_update(
    engine: StepEngine,
    t: dict[str, torch.Tensor],
    pair_loss: PairLoss,
    *,
    pad_id: int,
    steps: Steps,
    progress: float,
) -> dict[str, float]:
    """The engine's steps over this rank's pairs ``t``: a micro-batch's loss is its pairs'
    summed loss, a minibatch's denominator its pair count over every rank; a rank without
    pairs of a minibatch runs one zero-weight padding pair.

    Returns:
        The per-pair statistics averaged over every rank's pairs, plus the engine's
        ``loss/grad_norm``, ``optim/*`` and ``perf/learner_pairs_per_s``.
    """
    device = engine.ctx.device

    def denominator(rows: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(len(rows)), device=device)

    def micro_loss(idx: torch.Tensor | None) -> MicroOut:
        if idx is None:
            sub, weight = padding_pair(t, pad_id), torch.zeros(1, device=device)
        else:
            sub, weight = rows_of(t, idx), torch.ones(len(idx), device=device)
        loss_sum, stats = pair_loss(sub, weight)
        sums = {key: float((val.detach().float() * weight).sum()) for key, val in stats.items()}
        return MicroOut(loss_sum, float(weight.sum()), sums)

    return engine.run(t["prompt_ids"].shape[0], micro_loss, denominator, steps, progress)


def pair_stream(ctx: LearnerContext, hp: Any, seed: int) -> ShardStream:
    """This rank's share of ``hp.batch_size`` pairs per batch from its shard of ``lm.pairs``,
    in one global order over the ranks (the shared ``seed``), reshuffled each epoch with
    ``hp.shuffle``."""
    return ShardStream(ctx.datasets.get(PAIRS), hp.batch_size // ctx.world_size, seed, hp.shuffle)


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


#: Name of a labelled single-completion dataset (KTO, ILQL) handed to Ray Train.
LABELLED = "labelled"


def probe_labelled(cfg: RunConfig, field: str) -> TaskProbe:
    """:func:`probe_pairs` for the single-completion learners: ``<algo>.data`` is read,
    validated and tokenized (:func:`~rlft_ray.lm.labelled.load_labelled`, ``field`` the
    label column: ``label`` for KTO, ``reward`` for ILQL), the batch splits over the ranks,
    and the run's iterations are the optimizer steps of ``num_epochs`` passes. Every rank
    gets the held-out prompts.

    Raises:
        ConfigError: Naming the key at fault.
    """
    lm, res, hp = cfg.lm, cfg.resources, cfg.algo_config
    tok, info = check_model(cfg, lm.max_completion_tokens, "lm.max_completion_tokens")
    key = f"{cfg.algo}.data"
    if not hp.data:
        raise ConfigError(
            key, f"algo={cfg.algo} needs a file of prompt, completion and {field} rows"
        )
    if lm.reward_model is not None:
        raise ConfigError("lm.reward_model", f"algo={cfg.algo} learns from {key}; unset it")
    if hp.batch_size % res.num_learners:
        raise ConfigError(
            f"{cfg.algo}.batch_size",
            f"{hp.batch_size} rows cannot be split evenly over {res.num_learners} learners",
        )
    table, stats = load_labelled(hp.data, tok, lm, key, field)
    if stats.kept < hp.batch_size:
        raise ConfigError(
            f"{cfg.algo}.batch_size",
            f"is {hp.batch_size} but only {stats.kept} usable rows are in {hp.data}",
        )
    steps = math.ceil(hp.num_epochs * stats.kept / hp.batch_size)
    steps = min(steps, cfg.total_iterations or steps)
    run = absolute_paths(cfg)
    section = dataclasses.replace(hp, data=str(Path(hp.data).expanduser().resolve()))
    run = dataclasses.replace(
        run,
        **{cfg.algo: section},
        total_iterations=steps,
        total_env_steps=steps * hp.batch_size,
    )
    return TaskProbe(
        spaces=lm_spaces(cfg, tok),
        datasets={LABELLED: table},
        tables=heldout_tables(cfg, tok),
        info={**info, **stats.as_dict(prefix="data/")},
        cfg=run,
    )
