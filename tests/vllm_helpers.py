"""Shared by the vLLM backend tests: a tiny Llama vLLM's CPU attention runs, the ``lm``
section that samples it with vLLM, and the HF forward its recorded log-probs must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rlft_ray.config import LMConfig
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.types import GenerationBatch

TEMPERATURE = 0.7
#: Largest |log-prob gap| allowed between vLLM's record and an HF forward (fp32).
LOGPROB_TOL = 1e-4


def tiny_llama(out_dir: Path, **kwargs) -> Path:
    """A tiny random Llama whose head size (32) vLLM's CPU attention supports (the
    conftest's GPT-2 has 16, which it does not)."""
    return make_tiny_model(out_dir, arch="llama", **{"hidden": 64, "n_head": 2, **kwargs})


def vllm_lm(model: Path, **kwargs) -> LMConfig:
    return LMConfig(
        **{
            "model": str(model),
            "backend": "vllm",
            "temperature": TEMPERATURE,
            "max_new_tokens": 12,
            "num_samples": 4,
            "max_prompt_tokens": 32,
            **kwargs,
        }
    )


@torch.no_grad()
def hf_logprobs(policy: PolicyWithValueHead, batch: GenerationBatch) -> np.ndarray:
    """``[B, L]`` log-probs of the batch's sampled tokens under an HF forward (0 on padding)."""
    out = response_forward(
        policy,
        torch.as_tensor(batch.prompt_ids),
        torch.as_tensor(batch.prompt_mask),
        torch.as_tensor(batch.response_ids),
        torch.as_tensor(batch.response_mask),
        temperature=TEMPERATURE,
        entropy=False,
    )
    return out.logprobs.numpy() * batch.response_mask


def logprob_gap(policy: PolicyWithValueHead, batch: GenerationBatch) -> float:
    """Largest |HF log-prob - recorded log-prob| over the batch's real tokens."""
    return float(np.abs(hf_logprobs(policy, batch) - batch.logprobs).max())
