"""Prefill without repeats: each prompt once per group, a prefix all prompts share once.

``generate(num_return_sequences=n)`` repeats every prompt ``n`` times before its prefill,
and a chat template puts the same system message in front of every prompt: on the chat
example (a 40-token prompt, ~30 of them the template's, 8 prompts x 4 samples) the
prefill was half of the sampling's FLOPs, and most of a greedy evaluation's. Here:

1. the tokens every prompt of the chunk starts with (``common_prefix_len``) run once, as
   one row, and their KV cache is repeated for each prompt;
2. each prompt's remaining tokens but its last run once, on top of it;
3. that cache is repeated for each of the prompt's ``n`` samples, and ``generate``
   continues from it, feeding only the uncached last token.

The rows are laid out as ``[shared prefix | the rest, left-padded]``: the padding sits
between the two, masked. ``generate`` derives positions from the mask's cumulative sum
(``position_ids`` below does the same), so every real token keeps its position in the
unpadded prompt and attends to what it would in the plain call: the logits, hence greedy
tokens and the recorded log-probs, are the plain call's up to float rounding
(``tests/test_lm_generation.py`` checks tokens and log-probs against it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlft_ray.lm.policy import cache_kwarg, output_cache

if TYPE_CHECKING:
    from transformers import GenerationConfig, LogitsProcessorList

#: Fewest shared leading tokens worth a separate prefix pass.
MIN_SHARED_PREFIX = 8


def common_prefix_len(rows: list[list[int]]) -> int:
    """Tokens every row starts with, at most the shortest row's length minus one (each
    row keeps a token of its own to feed ``generate``)."""
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return max(length, 0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _layout(
    rows: list[list[int]], shared: int, pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k, shared + S]`` ids and mask: the shared prefix, then each row's rest
    left-padded to the longest rest ``S``."""
    width = max(len(r) for r in rows) - shared
    ids = torch.full((len(rows), shared + width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :shared] = torch.as_tensor(row[:shared])
        rest = row[shared:]
        ids[i, shared + width - len(rest) :] = torch.as_tensor(rest)
        mask[i, :shared] = 1
        mask[i, shared + width - len(rest) :] = 1
    return ids.to(device), mask.to(device)


def _repeatable(cache: Any) -> bool:
    return hasattr(cache, "batch_repeat_interleave")


@torch.no_grad()
def prefilled_generate(
    model: Any,
    rows: list[list[int]],
    n: int,
    config: GenerationConfig,
    processors: LogitsProcessorList | None,
    pad_id: int,
    min_shared: int = MIN_SHARED_PREFIX,
) -> torch.Tensor:
    """``n`` completions of each prompt in ``rows`` (token ids, unpadded), prefilled once.

    Args:
        model: A transformers causal LM.
        rows: ``k`` prompts' token ids.
        n: Completions per prompt (``config.num_return_sequences`` is ignored).
        config: Sampling or greedy settings of ``generate``.
        processors: Logits processors (the log-prob recorder).
        pad_id: The padding token.
        min_shared: Fewest shared leading tokens run as a separate pass.

    Returns:
        ``[k n, L]`` generated ids: prompt 0's ``n`` samples, then prompt 1's, ...
    """
    device = next(model.parameters()).device
    shared = common_prefix_len(rows) if len(rows) > 1 else 0
    shared = shared if shared >= min_shared else 0
    ids, mask = _layout(rows, shared, pad_id, device)
    cache = None
    if shared:  # 1. the shared prefix, one row
        out = model(
            input_ids=ids[:1, :shared],
            position_ids=_positions(mask[:1, :shared]),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output_cache(out)
        if not _repeatable(cache):  # a model whose cache cannot be repeated: plain prefill
            return _plain(model, rows, n, config, processors, pad_id)
        cache.batch_repeat_interleave(len(rows))
    if ids.shape[1] - 1 > shared:  # 2. each prompt's rest but its last token
        out = model(
            input_ids=ids[:, shared:-1],
            attention_mask=mask[:, :-1],
            position_ids=_positions(mask[:, :-1])[:, shared:],
            use_cache=True,
            logits_to_keep=1,
            **({} if cache is None else {cache_kwarg(model): cache}),
        )
        cache = output_cache(out)
    if cache is not None and not _repeatable(cache):
        return _plain(model, rows, n, config, processors, pad_id)
    if cache is not None and n > 1:  # 3. per sample
        cache.batch_repeat_interleave(n)
    return generate_repeated(model, ids, mask, n, config, processors, cache)


def generate_repeated(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    n: int,
    config: GenerationConfig,
    processors: LogitsProcessorList | None,
    cache: Any = None,
) -> torch.Tensor:
    """``generate`` over the prompts ``ids`` / ``mask`` ``[k, P]`` each repeated ``n``
    times, continuing ``cache`` (of all but their last column) where given.

    Returns:
        ``[k n, L]`` generated ids (prompt 0's ``n`` rows first). The rows are repeated
        here rather than by ``num_return_sequences`` (``config`` leaves it at 1), which
        ``generate`` refuses without ``do_sample`` (the recorder may draw the tokens itself).
    """
    out = model.generate(
        input_ids=ids.repeat_interleave(n, 0),
        attention_mask=mask.repeat_interleave(n, 0),
        generation_config=config,
        logits_processor=processors,
        **({} if cache is None else {cache_kwarg(model): cache}),
    )
    return out.sequences[:, ids.shape[1] :]


def _plain(
    model: Any,
    rows: list[list[int]],
    n: int,
    config: GenerationConfig,
    processors: LogitsProcessorList | None,
    pad_id: int,
) -> torch.Tensor:
    """``generate`` over the left-padded prompts, each repeated ``n`` times."""
    ids, mask = _layout(rows, 0, pad_id, next(model.parameters()).device)
    return generate_repeated(model, ids, mask, n, config, processors, None)
