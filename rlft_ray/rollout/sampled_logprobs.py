"""The sampled tokens' log-probs, recorded during ``generate`` (:class:`SampledLogprobs`)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

#: Tokens per block of :func:`draw`'s two-level search.
DRAW_BLOCK = 256


def draw(probs: torch.Tensor, block: int = DRAW_BLOCK) -> torch.Tensor:
    """One token per row of a categorical distribution, by inverting its CDF in two levels.

    ``torch.multinomial`` (what ``generate`` samples with) draws an exponential variate
    for every entry: 43 ms a step for 32 rows over a 49k vocabulary on 2 CPU cores, more
    than a third of a 135M model's decoding step. Here one uniform per row,
    u ~ U[0, total): the block of ``block`` tokens whose cumulative mass first exceeds u
    (block sums are one vectorised pass; a full-vocabulary cumsum is a sequential one),
    then the token inside it whose cumulative mass first exceeds the rest of u. The same
    distribution, up to float rounding.

    Args:
        probs: ``[B, V]`` non-negative weights (probabilities, not necessarily normalised).
        block: Tokens per block.

    Returns:
        ``[B]`` token ids; a zero-weight token is never drawn.
    """
    rows, vocab = probs.shape
    padded = torch.nn.functional.pad(probs, (0, -vocab % block))  # zeros: never drawn
    blocks = padded.view(rows, -1, block)  # [B, nb, block]
    block_cdf = blocks.sum(-1).cumsum(-1)  # [B, nb]
    u = torch.rand(rows, 1, device=probs.device, dtype=probs.dtype) * block_cdf[:, -1:]
    b = torch.searchsorted(block_cdf, u, right=True).clamp_max(block_cdf.shape[1] - 1)  # [B, 1]
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp_min(0)), 0.0)  # [B, 1]
    inner_cdf = blocks[torch.arange(rows, device=probs.device), b.squeeze(-1)].cumsum(-1)
    # the block's own sum can round below u - before: stay under its total (a positive token)
    rest = torch.minimum((u - before).clamp_min(0.0), inner_cdf[:, -1:] * (1 - 1e-6))
    i = torch.searchsorted(inner_cdf, rest, right=True)  # [B, 1]
    return (b * block + i).squeeze(-1)


class SampledLogprobs(LogitsProcessor):
    """Records log π(y_t) of each sampled token during ``generate``, one step at a time
    (a multi-turn turn's first token may be drawn by calling it before ``generate``, on
    the logits of a shared prefill: :mod:`rlft_ray.rollout.turn_cache`).

    ``output_logits=True`` keeps every step's logits, ``[B, T, V]`` fp32 (0.8 GB for 128
    samples of 32 tokens over a 49k vocabulary, twice that once stacked); this keeps one
    step's log-softmax ``[B, V]`` and the gathered values ``[B]`` per step. transformers
    runs custom processors before its temperature / top-p warpers, so ``scores`` are the
    raw logits and the recorded log-probs are those of softmax(logits / T) — what the
    learner computes.

    With ``draws`` the recorder also samples: it draws each step's tokens from
    softmax(logits / T) (:func:`draw`) and returns scores that are ``-inf`` but at the
    drawn token, for a ``generate`` called with ``do_sample=False`` whose argmax then
    takes it. The distribution is the one ``do_sample=True`` samples without top-p / top-k.

    Args:
        temperature: The sampling temperature T.
        draws: Sample here (``generate`` runs greedy over the returned scores).
    """

    def __init__(self, temperature: float, draws: bool = False) -> None:
        self.temperature = temperature
        self.draws = draws
        self.step_logps: torch.Tensor | None = None  # [B, V] of the last step
        self.taken: list[torch.Tensor] = []  # [B] per finished step
        self.recorded: torch.Tensor | None = None  # set by given()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.draws:
            logits = (
                scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
            )
            probs = torch.softmax(logits, dim=-1)  # [B, V]
            tokens = draw(probs)[:, None]  # [B, 1]
            self.taken.append(probs.gather(-1, tokens).squeeze(-1).log())  # > 0: drawn
            return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)
        if self.step_logps is not None:  # the token sampled at the previous step is in input_ids
            self.taken.append(self.step_logps.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.step_logps = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    @classmethod
    def given(cls, logprobs: torch.Tensor) -> SampledLogprobs:
        """A recorder that already holds ``[B, L]`` log-probs (value-guided decoding
        computes them itself); :meth:`finish` returns them."""
        recorder = cls(1.0)
        recorder.recorded = logprobs.to(torch.float32)
        return recorder

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """Log-probs ``[B, L]`` of ``response`` ``[B, L]`` (the generated ids)."""
        if self.recorded is not None:
            return self.recorded
        if self.draws:  # one entry per step, the drawn token's (a finished row's is masked)
            if response.shape[1] == 0 or not self.taken:
                return torch.zeros(response.shape, dtype=torch.float32)
            logps, self.taken = torch.stack(self.taken, dim=1), []
            return logps[:, : response.shape[1]].to(torch.float32)
        if self.step_logps is None or response.shape[1] == 0:
            return torch.zeros(response.shape, dtype=torch.float32)
        last = self.step_logps.gather(-1, response[:, -1:]).squeeze(-1)
        logps = torch.stack([*self.taken, last], dim=1)
        self.step_logps, self.taken = None, []
        return logps.to(torch.float32)
