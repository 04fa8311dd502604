"""The sampler's log-probs against the learner's: ``rollout/logprob_gap`` and TIS weights.

A vLLM engine (or a bf16 sampler under a float32 learner) records log-probs of the tokens
it sampled that differ from the learner's own by kernels and precision. The learner
measures the gap on the rows it trains and, with ``tis_cap``, weights each token by
truncated importance sampling, min(pi_learner / pi_sampler, C) (Yao et al. 2025, as verl
and OpenRLHF do for vLLM rollouts), taking its own log-probs as the PPO ratio's base.

Two ways to get pi_learner before the update:

- :func:`sampler_mismatch`, after a no-gradient pass over the rows
  (:meth:`~rlft_ray.learners.lm_rank.LMRank.learner_logprob_pass`): needed when the update
  takes several optimizer steps, since later minibatches see moved weights;
- :class:`InlineMismatch`, inside the update's own forward when the update is a single
  optimizer step: every micro-batch runs on the weights the update started from, so the
  detached log-probs of the update's forward are pi_learner (TRL's GRPO does the same with
  ``num_iterations=1``). This saves the pass, a third of the update's compute.

Both report the same metrics over the same tokens (the rows the update runs).
"""

from __future__ import annotations

import torch

from rlft_ray.algorithms import masked_sum
from rlft_ray.algorithms.lm import truncated_is_weights
from rlft_ray.learners.ddp import LearnerContext, global_max, global_sum


def _metrics(
    sums: torch.Tensor, top: torch.Tensor, tis_cap: float | None, ctx: LearnerContext
) -> dict[str, float]:
    """The metrics from this rank's ``sums`` (gap, tokens, TIS weights, clipped weights;
    ``[4]`` float64) and largest gap ``top``: none when no rank compared a token."""
    total = global_sum(sums, ctx)
    peak = global_max(top, ctx)
    if total[1] == 0:  # every rank skipped every row (a global count: all ranks agree)
        return {}
    tokens = float(total[1])
    metrics = {
        "rollout/logprob_gap": float(total[0]) / tokens,
        "rollout/logprob_gap_max": float(peak),
    }
    if tis_cap is not None:
        metrics["rollout/tis_mean"] = float(total[2]) / tokens
        metrics["rollout/tis_clipped_frac"] = float(total[3]) / tokens
    return metrics


def _token_sums(
    learner: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor, tis_cap: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(``[4]`` sums as in :func:`_metrics`, the largest gap, ``[b, L]`` TIS weights or
    None) of ``learner`` and ``sampler`` ``[b, L]`` log-probs over ``mask``'s tokens."""
    gap = (learner - sampler).abs().masked_fill(mask == 0, 0)
    mask = mask.float()
    weights = None if tis_cap is None else truncated_is_weights(learner, sampler, tis_cap)
    tis_sum = clipped = gap.new_zeros(())
    if weights is not None:
        tis_sum = masked_sum(weights, mask)
        clipped = ((weights >= tis_cap).float() * mask).sum()
    sums = torch.stack([gap.sum(), mask.sum(), tis_sum, clipped]).double()
    top = gap.max() if gap.numel() else gap.new_zeros(())
    return sums, top, weights


def sampler_mismatch(
    tensors: dict[str, torch.Tensor],
    tis_cap: float | None,
    ctx: LearnerContext,
    active: torch.Tensor | None = None,
) -> dict[str, float]:
    """``rollout/logprob_gap`` (mean and max |log p_learner - log p_sampler| over the
    sampled tokens of the ``active`` ``[B]`` rows, default all; none when no rank has
    one) from ``tensors["learner_logprobs"]`` ``[B, L]`` (a pass before the update) and,
    with ``tis_cap``, ``rollout/tis_mean`` / ``rollout/tis_clipped_frac``, the TIS weights
    (``tensors["tis"]``) and the learner's log-probs as the base of the PPO ratio
    (``tensors["ratio_logprobs"]``)."""
    if "learner_logprobs" not in tensors:
        return {}
    mask = tensors["mask"] if active is None else tensors["mask"] * active[:, None]
    learner = tensors["learner_logprobs"]
    sums, top, weights = _token_sums(learner, tensors["old_logprobs"], mask, tis_cap)
    if weights is not None:
        tensors["tis"] = weights
        tensors["ratio_logprobs"] = learner
    return _metrics(sums, top, tis_cap, ctx)


class InlineMismatch:
    """The same measurement and correction inside a single-step update's forward.

    :meth:`observe` takes each micro-batch's log-probs (with gradient) and returns their
    detached values: pi_learner, since the one optimizer step comes after every
    micro-batch. With ``tis_cap`` the caller takes them as the PPO ratio's base (as
    :func:`sampler_mismatch`'s ``ratio_logprobs``) and ``observe`` puts the TIS weights
    in the micro-batch's tensors (``sub["tis"]``); without it the ratio stays against the
    sampler's log-probs. :meth:`metrics` gives what :func:`sampler_mismatch` gives, over
    the tokens observed.
    """

    def __init__(self, tis_cap: float | None, ctx: LearnerContext) -> None:
        self.tis_cap, self.ctx = tis_cap, ctx
        self.sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)
        self.top = torch.zeros((), device=ctx.device)

    def observe(self, logprobs: torch.Tensor, sub: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[b, L]`` pi_learner of this micro-batch (``logprobs`` detached), adding its
        tokens to the gap and, with ``tis_cap``, setting ``sub["tis"]``."""
        learner = logprobs.detach()
        sums, top, weights = _token_sums(learner, sub["old_logprobs"], sub["mask"], self.tis_cap)
        self.sums += sums
        self.top = torch.maximum(self.top, top.float())
        if weights is not None:
            sub["tis"] = weights
        return learner

    def metrics(self) -> dict[str, float]:
        """The gap (and TIS) metrics over every rank's observed tokens (all ranks call this)."""
        return _metrics(self.sums, self.top, self.tis_cap, self.ctx)
