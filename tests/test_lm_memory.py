"""What bounds an LM learner's memory changes nothing it learns: token-budget micro-batches,
gradient checkpointing and chunked output heads give the same update; tied weights are
published once; a bf16 run computes in bf16 over float32 master weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlft_ray.learners.engine import Steps, micro_batches

from lm_helpers import make_batch, make_learner


def _after_one_update(model_dir: Path, batch, *overrides: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    learner = make_learner("grpo", model_dir, "grpo.kl_coef=0.05", *overrides)
    metrics = learner.update(batch, progress=0.0)
    assert metrics["optim/steps"] == 1.0
    return learner.policy_state(), metrics


def test_micro_batches_respect_rows_and_tokens() -> None:
    rows = torch.arange(6)
    tokens = torch.tensor([10, 10, 30, 5, 5, 50])
    got = micro_batches(rows, Steps(micro_batch_size=4, micro_batch_tokens=40), tokens)
    # 2 x 10 fits 40; 3 x 30 does not; 2 x 30 does not; 3 x 50 does not; a long row alone
    assert [m.tolist() for m in got] == [[0, 1], [2], [3, 4], [5]]
    assert [m.tolist() for m in micro_batches(rows, Steps(micro_batch_size=4))] == [
        [0, 1, 2, 3],
        [4, 5],
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        ("lm.micro_batch_tokens=24",),  # many small micro-batches
        ("lm.gradient_checkpointing=true",),
        ("lm.logit_chunk_tokens=3",),
    ],
)
def test_memory_bounds_give_the_same_update(model_dir: Path, overrides: tuple[str, ...]) -> None:
    batch = make_batch(model_dir)
    want, want_m = _after_one_update(model_dir, batch, "grpo.micro_batch_size=16")
    got, got_m = _after_one_update(model_dir, batch, "grpo.micro_batch_size=16", *overrides)
    if overrides[0].startswith("lm.gradient_checkpointing"):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [
            m
            for m in make_learner("grpo", model_dir, *overrides).core.model.modules()
            if isinstance(m, GradientCheckpointingLayer)
        ]
        assert layers and all(m.gradient_checkpointing and m.training for m in layers)
        assert not any(c.training for m in layers for c in m.children())  # dropout stays off
    if overrides[0].startswith("lm.micro_batch_tokens"):
        assert got_m["optim/grad_accum_steps"] > want_m["optim/grad_accum_steps"]
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=2e-6, rtol=1e-5, msg=key)
    assert got_m["loss/policy"] == pytest.approx(want_m["loss/policy"], abs=1e-6)


def test_tied_weights_are_published_once_and_load_into_the_actor(model_dir: Path) -> None:
    from rlft_ray.config import LMConfig
    from rlft_ray.rollout.generation import GenerationActor

    learner = make_learner("grpo", model_dir)
    model = learner.core.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    state = learner.policy_state()
    assert len(state) == len(model.state_dict()) - 1  # the head is the embedding
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.5)
    actor = GenerationActor(LMConfig(model=str(model_dir)), seed=0)
    actor.set_weights(learner.policy_state(), version=1)
    head = actor.model.get_output_embeddings().weight
    torch.testing.assert_close(head, model.get_output_embeddings().weight.detach())


def test_a_bf16_run_publishes_bf16_and_computes_in_bf16(model_dir: Path) -> None:
    learner = make_learner("grpo", model_dir, "lm.dtype=bfloat16", "grpo.kl_coef=0.0")
    state = learner.policy_state()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in learner.core.trainable())  # master weights
    batch = make_batch(model_dir)
    out = learner.core.forward(learner.core.net, learner.core.tensors(batch), torch.arange(4))
    fp32 = make_learner("grpo", model_dir, "grpo.kl_coef=0.0").core
    ref = fp32.forward(fp32.net, fp32.tensors(batch), torch.arange(4))
    gap = (out.logprobs - ref.logprobs).abs().max()
    assert 0 < gap < 0.5  # bf16 arithmetic: close to, but not bit-equal with, float32
