"""The one step engine of every LM learner: token losses (GRPO, PPO, RSFT) and pair losses
(DPO, online DPO, reward models) alike.

:class:`StepEngine` owns the optimizer (AdamW from the section's ``optim``), the learning
rate schedule, and the loop of ``num_epochs`` passes of ``num_minibatches`` optimizer
steps, each accumulating gradients over micro-batches. A learner supplies two functions:

- ``denominator(rows)``: this rank's share of a minibatch's loss denominator (its tokens
  under the section's loss aggregation, or its pairs); the engine sums it over ranks;
- ``micro_loss(rows)``: one micro-batch's loss numerator, its real unit count (tokens or
  pairs) and its summed statistics; ``rows`` is ``None`` for a zero-weight stand-in.

Each micro-batch's loss is its numerator over the minibatch's *global* denominator, times
the world size (which DDP's gradient averaging divides back out), so 2 DDP ranks or 4
micro-batches give the gradient of one rank with the whole minibatch. Ranks may hold
different numbers of rows (RSFT keeps what each actor accepted, online DPO skips flat
groups): a minibatch empty on every rank is skipped by all, and a rank with no rows of a
minibatch others have runs one zero-weight micro-batch, so every rank takes the same
optimizer steps and DDP's all-reduce always meets. DDP synchronises gradients only on
the last micro-batch (``no_sync`` before it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rlft_ray.algorithms import lr_factor
from rlft_ray.config.optim import OptimConfig
from rlft_ray.core.torch_utils import fused_optimizer
from rlft_ray.learners.ddp import LearnerContext, check_finite, global_sum


@dataclass
class MicroOut:
    """What one micro-batch contributes.

    Attributes:
        loss: Scalar loss numerator (the micro-batch's share of the minibatch's aggregated
            loss before division by the global denominator); carries the graph.
        count: Real units (tokens or pairs) in the micro-batch; 0 for a stand-in.
        stats: Metric name -> sum of a per-unit statistic over the real units.
    """

    loss: torch.Tensor
    count: float
    stats: dict[str, float] = field(default_factory=dict)


#: Rows of a micro-batch (``None``: a zero-weight stand-in) -> its contribution.
MicroLoss = Callable[[torch.Tensor | None], MicroOut]
#: Rows of a minibatch on this rank -> this rank's share of its loss denominator (scalar).
Denominator = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Steps:
    """How one update walks its batch.

    Attributes:
        num_epochs: Passes over the batch.
        num_minibatches: Optimizer steps per pass.
        micro_batch_size: Rows per forward/backward.
        keep_order: Keep each minibatch's rows in batch order (a GRPO group's completions
            then share micro-batches, and one prompt pass; the gradient is the same sum).
        unit: What the rows' counts are, for ``perf/learner_<unit>_per_s``.
        micro_batch_tokens: Most tokens in one micro-batch (rows x the longest row's
            tokens, as padded); None: ``micro_batch_size`` rows alone decide.
    """

    num_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int = 8
    keep_order: bool = False
    unit: str = "tokens"
    micro_batch_tokens: int | None = None


def micro_batches(
    rows: torch.Tensor, steps: Steps, row_tokens: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Consecutive micro-batches of ``rows``: at most ``micro_batch_size`` rows each and,
    with ``micro_batch_tokens`` and ``row_tokens`` (tokens of every row of the batch), at
    most that many padded tokens (a single longer row still forms its own micro-batch)."""
    if steps.micro_batch_tokens is None or row_tokens is None:
        return list(torch.split(rows, steps.micro_batch_size))
    sizes = row_tokens[rows].tolist()
    out, start, longest = [], 0, 0
    for i, size in enumerate(sizes):
        longest_with = max(longest, size)
        full = i - start >= steps.micro_batch_size
        if i > start and (full or longest_with * (i - start + 1) > steps.micro_batch_tokens):
            out.append(rows[start:i])
            start, longest_with = i, size
        longest = longest_with
    if len(sizes) > start:
        out.append(rows[start:])
    return out


class StepEngine:
    """A rank's optimizer, schedule and micro-batched optimisation.

    Args:
        ctx: This rank's context (world size, device) for the global sums.
        net: The module the micro-batch losses run through (DDP-wrapped with several ranks:
            its ``no_sync`` skips the all-reduce of all but the last micro-batch).
        params: The parameters the optimizer steps (with LoRA: the adapters).
        optim: AdamW and its schedule.
        generator: Seeds the minibatch permutation.
    """

    def __init__(
        self,
        ctx: LearnerContext,
        net: nn.Module,
        params: list[nn.Parameter],
        optim: OptimConfig,
        generator: torch.Generator,
    ) -> None:
        self.ctx, self.net, self.params, self.optim = ctx, net, params, optim
        self.generator = generator
        self.optimizer = self.new_optimizer()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh AdamW over :attr:`params` (fused where the device has the kernel)."""
        return fused_optimizer(
            torch.optim.AdamW,
            self.params,
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=self.optim.betas,
        )

    def reset_optimizer(self) -> torch.optim.Optimizer:
        """Start over with a fresh optimizer (RSFT's ``reset_to_base``); returns it."""
        self.optimizer = self.new_optimizer()
        return self.optimizer

    def set_lr(self, progress: float) -> float:
        """The learning rate after warmup and decay at ``progress`` in [0, 1], applied."""
        o = self.optim
        lr = o.lr * lr_factor(progress, o.lr_schedule, o.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _accumulate(
        self,
        micro: list[torch.Tensor | None],
        micro_loss: MicroLoss,
        den: torch.Tensor,
        sums: dict[str, float],
    ) -> float:
        """Backward of each micro-batch's loss over the global denominator ``den``
        (DDP synchronises on the last one only); adds their statistics to ``sums`` and
        returns their units."""
        units = 0.0
        for k, rows in enumerate(micro):
            sync = contextlib.nullcontext()
            if k < len(micro) - 1 and self.ctx.world_size > 1:
                sync = self.net.no_sync()
            with sync:
                out = micro_loss(rows)
                loss = out.loss * self.ctx.world_size / den
                check_finite("loss/total", loss)
                loss.backward()
            units += out.count
            for key, value in out.stats.items():
                sums[key] = sums.get(key, 0.0) + value
        return units

    def run(
        self,
        num_rows: int,
        micro_loss: MicroLoss,
        denominator: Denominator,
        steps: Steps,
        progress: float,
        row_tokens: torch.Tensor | None = None,
        active: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """``steps.num_epochs`` passes of ``steps.num_minibatches`` optimizer steps.

        ``row_tokens`` (``[num_rows]``) bounds micro-batches by ``steps.micro_batch_tokens``.
        ``active`` (``[num_rows]`` bool) marks the rows whose loss can be nonzero: the
        others (a GRPO row with zero advantage and no KL in its loss) count in the
        denominator but never run forward or backward, since their gradient is exactly
        zero. A minibatch with no active row on any rank still takes its optimizer step,
        on zero gradients, as the full computation would.

        Returns:
            Every statistic of ``micro_loss`` averaged over all ranks' units (of the rows
            that ran), ``loss/grad_norm`` (mean over the steps), ``optim/lr``,
            ``optim/steps``, ``optim/grad_accum_steps`` and ``perf/learner_<unit>_per_s``.
        """
        ctx = self.ctx
        lr = self.set_lr(progress)
        sums: dict[str, float] = {}
        units, norms, accum = 0.0, [], 0
        start = time.perf_counter()
        for _epoch in range(steps.num_epochs):
            perm = torch.randperm(num_rows, generator=self.generator)
            splits = torch.tensor_split(perm, steps.num_minibatches)
            if steps.keep_order:
                splits = tuple(mb.sort().values for mb in splits)
            splits = [mb.to(ctx.device) for mb in splits]
            runs = [mb if active is None else mb[active[mb]] for mb in splits]
            counts = torch.tensor(
                [[float(len(mb)), float(len(run))] for mb, run in zip(splits, runs)],
                device=ctx.device,
            ).reshape(-1, 2)
            for mb, run, (size, size_run) in zip(splits, runs, global_sum(counts, ctx).tolist()):
                if size == 0:
                    continue  # empty on every rank: no step anywhere
                den = global_sum(denominator(mb), ctx).clamp_min(1e-8)
                micro = micro_batches(run, steps, row_tokens) if len(run) else [None]
                if size_run == 0:  # no active row anywhere: only the step on zero gradients
                    micro = []
                    for p in self.params:
                        p.grad = torch.zeros_like(p)
                accum = max(accum, len(micro))
                units += self._accumulate(micro, micro_loss, den, sums)
                norm = nn.utils.clip_grad_norm_(self.params, self.optim.max_grad_norm)
                check_finite("loss/grad_norm", norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                norms.append(float(norm))
        elapsed = time.perf_counter() - start
        local = torch.tensor([units, *sums.values()], dtype=torch.float64, device=ctx.device)
        total = global_sum(local, ctx).cpu().tolist()
        metrics = {key: value / max(total[0], 1.0) for key, value in zip(sums, total[1:])}
        metrics.update(
            {
                "loss/grad_norm": sum(norms) / max(len(norms), 1),
                "optim/lr": lr,
                "optim/steps": float(len(norms)),
                "optim/grad_accum_steps": float(accum),
                f"perf/learner_{steps.unit}_per_s": total[0] / max(elapsed, 1e-9),
            }
        )
        return metrics
