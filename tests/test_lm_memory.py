"""What bounds an LM learner's memory changes nothing it learns: token-budget micro-batches,
gradient checkpointing and chunked output heads give the same update; tied weights are
published once; a bf16 run computes in bf16 over float32 master weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_truncated_is_weights_hand_values() -> None:
    from rlft_ray.algorithms.lm import truncated_is_weights

    learner = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.0, -2.5, -0.1]])
    got = truncated_is_weights(learner, sampler, cap=1.5)
    # exp(0) = 1, exp(0.5) = 1.6487 -> capped at 1.5, exp(-0.4) = 0.6703
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.5, 0.670320046]]))


def test_the_sampler_gap_is_measured_and_tis_corrects_it(model_dir: Path) -> None:
    batch = make_batch(model_dir)
    # the actor sampled with the learner's weights and kernels: no gap, TIS weights of 1
    plain, plain_m = _after_one_update(model_dir, batch, "grpo.micro_batch_size=16")
    same, same_m = _after_one_update(
        model_dir, batch, "grpo.micro_batch_size=16", "grpo.tis_cap=2.0"
    )
    assert same_m["rollout/logprob_gap"] < 1e-5 and same_m["rollout/tis_mean"] == pytest.approx(
        1.0, abs=1e-5
    )
    for key, value in plain.items():
        torch.testing.assert_close(same[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert "rollout/logprob_gap" not in plain_m  # HF sampler, no TIS: nothing recomputed
    # a sampler whose log-probs are 0.3 lower on every token (another distribution)
    shifted = make_batch(model_dir)
    shifted.logprobs = np.where(shifted.response_mask, shifted.logprobs - 0.3, 0.0).astype(
        np.float32
    )
    _, m = _after_one_update(model_dir, shifted, "grpo.micro_batch_size=16", "grpo.tis_cap=2.0")
    assert m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)
    assert m["rollout/logprob_gap_max"] == pytest.approx(0.3, abs=1e-4)
    assert m["rollout/tis_mean"] == pytest.approx(float(np.exp(0.3)), abs=1e-3)
    assert m["rollout/tis_clipped_frac"] == 0.0
    _, capped = _after_one_update(
        model_dir, shifted, "grpo.micro_batch_size=16", "grpo.tis_cap=1.2"
    )
    assert (
        capped["rollout/tis_mean"] == pytest.approx(1.2)
        and capped["rollout/tis_clipped_frac"] == 1.0
    )


def _policy_reads(learner) -> list[int]:
    """Records the rows of every forward of the policy (the reference's are left out)."""
    calls: list[int] = []
    forward, policy = learner.core.forward, learner.core.policy

    def recorded(module, t, idx, **kw):
        if module is policy:
            calls.extend(idx.tolist())
        return forward(module, t, idx, **kw)

    learner.core.forward = recorded
    return calls


def test_the_learner_recomputes_log_probs_only_on_the_rows_it_trains(model_dir: Path) -> None:
    """Without a KL term in the loss a group scored alike is skipped by the update, so the
    learner's own log-prob pass (TIS, the vLLM gap) leaves its rows out: a sampler 5 nats
    off on the flat groups and 0.3 off on the others reads a gap of 0.3, not 5, and the
    policy reads only the other groups' rows; a batch of flat groups only reports no gap."""
    from lm_helpers import GROUP

    batch = make_batch(model_dir)
    flat = np.ptp(batch.rewards.reshape(-1, GROUP), axis=-1) == 0  # [groups]
    assert flat.any() and not flat.all()
    rows_flat = np.repeat(flat, GROUP)
    shift = np.where(rows_flat, 5.0, 0.3)[:, None]
    batch.logprobs = np.where(batch.response_mask, batch.logprobs - shift, 0.0).astype(np.float32)
    learner = make_learner("grpo", model_dir, "grpo.kl_coef=0.0", "grpo.tis_cap=2.0")
    read = _policy_reads(learner)  # the reference reads every row
    m = learner.update(batch, progress=0.0)
    assert m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)
    assert m["rollout/logprob_gap_max"] == pytest.approx(0.3, abs=1e-4)
    assert m["rollout/tis_mean"] == pytest.approx(float(np.exp(0.3)), abs=1e-3)
    assert sorted(set(read)) == np.flatnonzero(~rows_flat).tolist()
    all_flat = make_batch(model_dir)
    all_flat.rewards[:] = 1.0
    m = make_learner("grpo", model_dir, "grpo.kl_coef=0.0", "grpo.tis_cap=2.0").update(
        all_flat, progress=0.0
    )
    assert "rollout/logprob_gap" not in m and m["optim/skipped_rows_frac"] == 1.0


def test_a_single_step_update_takes_the_learners_log_probs_from_its_own_forward(
    model_dir: Path,
) -> None:
    """One optimizer step per batch (the default): the update's forward runs on the
    weights the batch was sampled for, so it gives the gap and the TIS weights without
    a pass of its own; each trained row is read once, not twice, and the metrics, the
    gradient step and the parameters equal those of the separate pass. With two
    minibatches the second step sees moved weights, so the pass runs first."""
    from lm_helpers import GROUP

    batch = make_batch(model_dir)
    flat = np.repeat(np.ptp(batch.rewards.reshape(-1, GROUP), axis=-1) == 0, GROUP)
    shift = np.where(flat, 5.0, 0.3)[:, None]  # the flat group's rows are never compared
    batch.logprobs = np.where(batch.response_mask, batch.logprobs - shift, 0.0).astype(np.float32)
    args = ("grpo.kl_coef=0.0", "grpo.tis_cap=1.3", "grpo.micro_batch_size=3")
    runs = {}
    for how in ("inline", "pass"):
        torch.manual_seed(0)
        learner = make_learner("grpo", model_dir, *args)
        if how == "pass":
            learner.core.single_step = lambda: False
        reads = _policy_reads(learner)
        metrics = learner.update(batch, progress=0.0)
        runs[how] = (reads, metrics, learner.policy_state())
    trained = np.flatnonzero(~flat).tolist()
    assert sorted(runs["inline"][0]) == trained  # the update's forward only
    assert sorted(runs["pass"][0]) == sorted(trained * 2)  # the pass, then the update
    inline_m, pass_m = runs["inline"][1], runs["pass"][1]
    assert inline_m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)
    assert inline_m["rollout/logprob_gap_max"] == pytest.approx(0.3, abs=1e-4)
    # exp(0.3) = 1.35 is capped at 1.3 on every token
    assert inline_m["rollout/tis_mean"] == pytest.approx(1.3, abs=1e-6)
    assert inline_m["rollout/tis_clipped_frac"] == 1.0
    for key in ("logprob_gap", "logprob_gap_max", "tis_mean", "tis_clipped_frac"):
        assert inline_m[f"rollout/{key}"] == pytest.approx(pass_m[f"rollout/{key}"], abs=1e-5)
    assert inline_m["loss/policy"] == pytest.approx(pass_m["loss/policy"], abs=1e-5)
    for key, value in runs["pass"][2].items():
        torch.testing.assert_close(runs["inline"][2][key], value, atol=2e-5, rtol=0, msg=key)
    two_steps = make_learner("grpo", model_dir, *args, "grpo.num_minibatches=2")
    reads = _policy_reads(two_steps)
    m = two_steps.update(batch, progress=0.0)
    assert m["optim/steps"] == 2.0 and sorted(reads) == sorted(trained * 2)
    assert m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)


def test_token_ppo_measures_the_gap_and_weights_by_tis_from_its_value_pass(
    model_dir: Path,
) -> None:
    """Token-level PPO takes several optimizer steps, so the learner's log-probs come from
    its no-gradient pass (with the old values): a sampler 0.3 nats below the learner reads
    a gap of 0.3 and TIS weights of exp(0.3); with a cap of 1.2 every weight is clipped."""
    batch = make_batch(model_dir)
    batch.logprobs = np.where(batch.response_mask, batch.logprobs - 0.3, 0.0).astype(np.float32)
    for cap, tis_mean, clipped in ((2.0, float(np.exp(0.3)), 0.0), (1.2, 1.2, 1.0)):
        learner = make_learner("lm_ppo", model_dir, f"lm_ppo.tis_cap={cap}")
        assert not learner.core.single_step()
        m = learner.update(batch, progress=0.0)
        assert m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)
        assert m["rollout/logprob_gap_max"] == pytest.approx(0.3, abs=1e-4)
        assert m["rollout/tis_mean"] == pytest.approx(tis_mean, abs=1e-3)
        assert m["rollout/tis_clipped_frac"] == clipped
    plain = make_learner("lm_ppo", model_dir).update(batch, progress=0.0)
    assert "rollout/logprob_gap" not in plain  # HF sampler, no TIS: nothing recomputed


def test_without_tis_the_single_step_ratio_stays_on_the_samplers_log_probs(
    model_dir: Path,
) -> None:
    """Behind vLLM without TIS the update still measures the gap from its own forward, but
    its PPO ratio is against the sampler's log-probs, as with the separate pass: a sampler
    0.3 nats below the learner gives ratios of exp(0.3) = 1.35, clipped at 1.2, and the
    same step as the pass."""
    batch = make_batch(model_dir)
    batch.logprobs = np.where(batch.response_mask, batch.logprobs - 0.3, 0.0).astype(np.float32)
    runs = {}
    for how in ("inline", "pass"):
        torch.manual_seed(0)
        learner = make_learner("grpo", model_dir, "grpo.kl_coef=0.0", "grpo.micro_batch_size=3")
        learner.core.recomputes_logprobs = lambda tis_cap: True  # what lm.backend=vllm does
        if how == "pass":
            learner.core.single_step = lambda: False
        runs[how] = (learner.update(batch, progress=0.0), learner.policy_state())
    (inline_m, inline_p), (pass_m, pass_p) = runs["inline"], runs["pass"]
    assert inline_m["rollout/logprob_gap"] == pytest.approx(0.3, abs=1e-4)
    assert "rollout/tis_mean" not in inline_m
    assert inline_m["loss/clip_frac"] == pytest.approx(pass_m["loss/clip_frac"], abs=1e-6)
    assert inline_m["loss/clip_frac"] > 0.1  # ratio 1.35 > 1 + clip_low on positive rows
    assert inline_m["loss/policy"] == pytest.approx(pass_m["loss/policy"], abs=1e-5)
    for key, value in pass_p.items():
        torch.testing.assert_close(inline_p[key], value, atol=2e-5, rtol=0, msg=key)
