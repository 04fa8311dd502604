"""Value-guided decoding on the generation actors (``lm.decode: ilql``).

:class:`ValueGuidedDecoding` is mixed into :class:`~rlft_ray.rollout.generation.GenerationActor`:
it finds the ILQL heads beside the model (``ilql_heads.safetensors`` in a checkpoint's
``policy/``), takes the heads an ILQL learner publishes with its weights (tensor names
prefixed ``ilql_heads.``), and decodes a chunk of prompts with
:func:`~rlft_ray.lm.ilql_heads.ilql_generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlft_ray.config import LMConfig
from rlft_ray.lm.ilql_heads import HEADS_FILE, HEADS_PREFIX, ILQLHeads, ilql_generate, load_heads

if TYPE_CHECKING:
    from transformers import GenerationConfig


class ValueGuidedDecoding:
    """The ILQL heads of a generation actor and its value-guided decoding."""

    lm: LMConfig
    device: torch.device
    model: Any
    eos_ids: list[int]
    pad_id: int
    ilql_heads: ILQLHeads | None = None

    def _init_value_guidance(self, path: str) -> None:
        """Load the heads saved beside ``path`` when ``lm.decode`` is ``ilql`` and they exist
        (a run's starting model has none: its learner publishes them before sampling)."""
        if self.lm.decode == "ilql" and (Path(path) / HEADS_FILE).is_file():
            self.ilql_heads = load_heads(path, self.device)

    def _take_ilql_heads(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Split published ILQL heads off ``weights`` and load them; returns the LM's weights."""
        heads = {
            k[len(HEADS_PREFIX) :]: torch.as_tensor(v)
            for k, v in weights.items()
            if k.startswith(HEADS_PREFIX)
        }
        if not heads:
            return weights
        if self.ilql_heads is None:
            hidden, vocab = heads["q1.0.weight"].shape[1], heads["q1.2.weight"].shape[0]
            self.ilql_heads = ILQLHeads(hidden, vocab).to(self.device).eval()
        self.ilql_heads.load_state_dict(heads)
        return {k: v for k, v in weights.items() if not k.startswith(HEADS_PREFIX)}

    def _ilql_chunk(
        self,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        n: int,
        config: GenerationConfig,
        greedy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` value-guided completions per prompt: ``(tokens [N n, T], logprobs [N n, T])``.

        Raises:
            ValueError: No heads were found beside the model or published.
        """
        if self.ilql_heads is None:
            raise ValueError(
                f"lm.decode=ilql: no ILQL heads ({HEADS_FILE} is not beside {self.lm.model} "
                "and no ILQL learner published them)"
            )
        ids = torch.as_tensor(prompt_ids, device=self.device).repeat_interleave(n, 0)
        mask = torch.as_tensor(prompt_mask, device=self.device).repeat_interleave(n, 0)
        return ilql_generate(
            self.model,
            self.ilql_heads,
            ids,
            mask,
            config.max_new_tokens,
            self.eos_ids,
            self.pad_id,
            self.lm.decode_beta,
            self.lm.temperature,
            greedy,
        )
