"""The sampled tokens' log-probs, recorded during ``generate`` (:class:`SampledLogprobs`)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampledLogprobs(LogitsProcessor):
    """Records log π(y_t) of each sampled token during ``generate``, one step at a time.

    ``output_logits=True`` keeps every step's logits, ``[B, T, V]`` fp32 (0.8 GB for 128
    samples of 32 tokens over a 49k vocabulary, twice that once stacked); this keeps one
    step's log-softmax ``[B, V]`` and the gathered values ``[B]`` per step. transformers
    runs custom processors before its temperature / top-p warpers, so ``scores`` are the
    raw logits and the recorded log-probs are those of softmax(logits / T) — what the
    learner computes.

    Args:
        temperature: The sampling temperature T.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.step_logps: torch.Tensor | None = None  # [B, V] of the last step
        self.taken: list[torch.Tensor] = []  # [B] per finished step
        self.recorded: torch.Tensor | None = None  # set by given()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
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
        if self.step_logps is None or response.shape[1] == 0:
            return torch.zeros(response.shape, dtype=torch.float32)
        last = self.step_logps.gather(-1, response[:, -1:]).squeeze(-1)
        logps = torch.stack([*self.taken, last], dim=1)
        self.step_logps, self.taken = None, []
        return logps.to(torch.float32)
