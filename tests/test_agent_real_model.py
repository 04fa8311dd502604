"""A real instruct model as a text-environment agent: SmolLM2-135M-Instruct (the GGUF
fixture) plays rlft/ToolArithmetic-v0 in ChatML. Slow; skipped when the fixture cannot
be had (``python -m rlft_ray.lm.fixtures``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlft_ray.config import EnvConfig, LMConfig
from rlft_ray.lm import fixtures
from rlft_ray.rollout.evaluate import seed_prompts
from rlft_ray.rollout.generation import GenerationActor

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf")
    from rlft_ray.lm.loading import resolve_model_path

    try:
        return Path(resolve_model_path(str(fixtures.fetch_smollm2_gguf())))
    except fixtures.FixtureUnavailable as exc:
        pytest.skip(f"SmolLM2 GGUF fixture unavailable: {exc}")


def test_smollm2_plays_chatml_tool_episodes_with_its_special_tokens(smollm2_dir: Path) -> None:
    """Sampled episodes complete; the ChatML markers the env writes are the tokenizer's
    special tokens (one id each, not characters), the model's turns end with its
    ``<|im_end|>`` EOS, and only the model's tokens carry the loss."""
    lm = LMConfig(
        model=str(smollm2_dir), num_samples=4, max_new_tokens=24, max_turns=2,
        max_episode_tokens=256, temperature=0.7,
    )  # fmt: skip
    env = EnvConfig(id="rlft/ToolArithmetic-v0", kwargs={"chat": True, "call_bonus": 0.2})
    actor = GenerationActor(lm, seed=0, env=env)
    batch = actor.sample(seed_prompts([0, 1, 2, 3]))
    tok = actor.tokenizer
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert len(batch) == 16 and not batch.agent.failed.any()
    assert batch.prompts[0].endswith("<|im_start|>assistant\n")
    prompt = batch.prompt_ids[0][batch.prompt_mask[0]].tolist()
    # system, the worked episode (4 messages), the question; then the assistant header
    assert prompt.count(start) == 7 and prompt.count(end) == 6
    for row in range(len(batch)):
        ids = batch.response_ids[row][batch.response_mask[row]]
        model = batch.loss_mask[row][: len(ids)]
        if batch.agent.turns[row] == 2:  # a call (or a failed one) came back as a user message
            first = int(np.argmin(model))  # the env's first token
            assert ids[~model].tolist().count(start) == 2 and ids[~model].tolist().count(end) == 1
            assert ids[first - 1] == end or first == lm.max_new_tokens  # EOS, or the cap
    assert batch.agent.turns.max() <= 2
    # the answer's 1 and the first call's 0.2, summed over the turns
    assert all(np.isclose(r, [0.0, 0.2, 1.0, 1.2]).any() for r in batch.rewards)
