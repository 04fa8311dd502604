"""Masked reductions over right-padded token matrices, and loss aggregation.

Conventions: ``x`` and ``mask`` are ``[B, L]``; ``mask`` is bool or {0, 1} weights,
1 on real tokens. Reductions replace masked entries by 0 first, so NaN/inf in padding
never leaks into a result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mask as a floating tensor of ``like``'s dtype (bool -> {0, 1})."""
    return mask.to(like.dtype) if like.is_floating_point() else mask.float()


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (any shape) with the positions where ``mask`` (same shape) is 0 set to 0."""
    return x.masked_fill(mask == 0, 0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is non-zero.

    ``sum_t x_t * m_t`` over ``dim`` (all elements when ``dim`` is None). Masked-out
    entries are replaced by 0 before multiplying, so NaN/inf in padding cannot leak.

    Args:
        x: Any shape, e.g. ``[B, L]``.
        mask: Same shape as ``x``; bool or float weights.
        dim: Dimension to reduce, or None for a scalar.

    Returns:
        Scalar (``dim=None``) or ``x`` with ``dim`` reduced.
    """
    w = _as_weights(mask, x)
    xm = zero_padding(x, mask) * w
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    ``sum_t x_t * m_t / sum_t m_t`` over ``dim`` (all elements when ``dim`` is None).
    The denominator is clamped to at least 1e-8, so an all-masked slice gives 0
    rather than NaN.

    Args:
        x: Any shape, e.g. ``[B, L]``.
        mask: Same shape as ``x``; bool or float weights.
        dim: Dimension to reduce, or None for a scalar.

    Returns:
        Scalar (``dim=None``) or ``x`` with ``dim`` reduced.
    """
    w = _as_weights(mask, x)
    denom = w.sum() if dim is None else w.sum(dim=dim)
    return masked_sum(x, mask, dim) / denom.clamp_min(1e-8)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Standardise ``x`` with statistics taken over the masked positions only.

    With n = sum(m), mu = sum(m x) / n, and the unbiased (Bessel-corrected) masked
    variance ``var = (sum(m x^2) - n mu^2) / max(n - 1, 1)``::

        shift_mean=True:   x' = (x - mu) / sqrt(var + eps)
        shift_mean=False:  x' = (x - mu) / sqrt(var + eps) + mu   (scale only)

    This is the whitening used for PPO advantages in RLHF (Ziegler et al. 2019,
    "Fine-Tuning Language Models from Human Preferences"; TRL's ``masked_whiten``).
    Padded positions of the output are set to 0. The moments are float64 sums, so a
    ``reduce`` that sums them over DDP ranks gives statistics over every rank's tokens.

    Args:
        x: ``[B, L]`` values (e.g. token advantages).
        mask: ``[B, L]`` bool or {0, 1}.
        shift_mean: Subtract the mean (True) or only rescale (False).
        eps: Added to the variance before the square root.
        reduce: Applied to the ``[3]`` moments ``(sum m x, sum m x^2, n)`` before use
            (e.g. an all-reduce sum); None: this tensor's positions only.

    Returns:
        ``[B, L]`` tensor of ``x``'s dtype.
    """
    w = _as_weights(mask, x)
    xz = zero_padding(x, mask)  # padding may hold NaN / inf
    moments = torch.stack([(xz * w).sum(), (xz * xz * w).sum(), w.sum()]).double()
    if reduce is not None:
        moments = reduce(moments)
    total, sq, n = moments.unbind()
    mean = total / n.clamp_min(1.0)
    var = (sq - n * mean * mean).clamp_min(0.0) / (n - 1.0).clamp_min(1.0)
    whitened = (x - mean.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype)
    if not shift_mean:
        whitened = whitened + mean.to(x.dtype)
    return whitened.masked_fill(mask == 0, 0)


def aggregate_loss_parts(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of a per-token loss reduced to a scalar, kept apart so they
    can be summed over shards.

    The loss is ``num / den``; with m the mask, |y_i| = sum_t m_it and B the rows::

        "token-mean":          num = sum_{i,t} l_it m_it,            den = sum_{i,t} m_it
                               (every token weighs the same; DAPO, Yu et al. 2025)
        "seq-mean-token-mean": num = sum_i sum_t l_it m_it / |y_i|,  den = B
                               (GRPO, Shao et al. 2024, "DeepSeekMath")
        "seq-mean-token-sum":  num = sum_i sum_t l_it m_it,          den = B
                               (no length normalisation)
        "seq-mean-token-sum-norm": num = sum_i sum_t l_it m_it,      den = B * L_max
                               (Dr. GRPO, Liu et al. 2025: a constant normaliser, the
                               generation budget L_max = ``max_tokens``; verl's name)

    A row with no real tokens contributes 0 to the sequence modes but still counts in B.
    Splitting a batch into micro-batches (or DDP ranks) and computing
    ``sum(num_k) / sum(den_k)`` gives exactly the full-batch loss, which is how the step
    engine keeps gradient accumulation and DDP equal to one big batch.

    Args:
        loss_mat: ``[B, L]`` per-token losses.
        mask: ``[B, L]`` bool or {0, 1}.
        mode: One of the modes above.
        max_tokens: L_max of ``seq-mean-token-sum-norm`` (required there, unused otherwise).

    Returns:
        ``(numerator, denominator)``, scalars; the numerator carries the gradient.

    Raises:
        ValueError: Unknown ``mode``, or ``seq-mean-token-sum-norm`` without ``max_tokens``.
    """
    rows = torch.tensor(float(loss_mat.shape[0]), device=loss_mat.device)
    if mode == "token-mean":
        return masked_sum(loss_mat, mask), _as_weights(mask, loss_mat).sum()
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_mat, mask, dim=-1).sum(), rows
    if mode == "seq-mean-token-sum":
        return masked_sum(loss_mat, mask, dim=-1).sum(), rows
    if mode == "seq-mean-token-sum-norm":
        if max_tokens is None or max_tokens < 1:
            raise ValueError(f"{mode} needs max_tokens >= 1 (the generation budget)")
        return masked_sum(loss_mat, mask, dim=-1).sum(), rows * float(max_tokens)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {_AGG_MODES}")
