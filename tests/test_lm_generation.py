"""Generation actor without Ray: sampling round trip, EOS masks, log-probs, weight sync, rewards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from rlft_ray.config import LMConfig
from rlft_ray.lm.policy import PolicyWithValueHead, response_forward
from rlft_ray.lm.tiny import make_tiny_model
from rlft_ray.rewards import RewardError
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.prefill import common_prefix_len, prefilled_generate
from rlft_ray.rollout.sampled_logprobs import SampledLogprobs, draw
from rlft_ray.types import UNSYNCED_VERSION, GenerationBatch, Prompt

from lm_helpers import generate_with_drawing_recorder

PROMPTS = ["1+2=", "12+34=", "5+7=", "40+40="]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("m2") / "tiny",
        n_layer=1,
        hidden=32,
        n_head=2,
        max_positions=64,
        seed=1,
    )


def _actor(model_dir: Path, **lm_kwargs) -> GenerationActor:
    lm = LMConfig(**{"model": str(model_dir), "max_new_tokens": 6, "num_samples": 3, **lm_kwargs})
    return GenerationActor(lm, seed=0)


def _prompts(actor: GenerationActor) -> list[Prompt]:
    return [Prompt(t, actor.tokenizer(t)["input_ids"], {"answer": "3"}) for t in PROMPTS]


def _check_eos_masks(batch: GenerationBatch, eos_ids: list[int], pad: int) -> None:
    for ids, mask in zip(batch.response_ids, batch.response_mask):
        real = ids[mask]
        # real tokens are a prefix; an EOS, if any, is the last real token
        assert mask[: len(real)].all() and not mask[len(real) :].any()
        assert not np.isin(real[:-1], eos_ids).any()
        if len(real) < batch.response_ids.shape[1]:
            assert real[-1] in eos_ids
        assert (ids[~mask] == pad).all()


def test_generate_round_trip(model_dir: Path) -> None:
    actor = _actor(model_dir)
    batch = actor.sample(_prompts(actor))
    b = len(PROMPTS) * 3
    assert batch.response_ids.shape[0] == b and batch.prompt_ids.shape == (b, 6)
    assert batch.response_ids.shape[1] <= 6 and batch.num_steps == b
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch.prompts[:3] == ["1+2="] * 3 and batch.metadata[0] == {"answer": "3"}
    # prompts are left-padded: "1+2=" has 4 tokens in a 6-wide block
    assert batch.prompt_mask[0].tolist() == [False, False, True, True, True, True]
    assert batch.policy_version == UNSYNCED_VERSION and batch.group_size == 3  # no weights yet
    assert batch.rewards.shape == (b,) and set(batch.rewards.tolist()) <= {0.0, 1.0}
    _check_eos_masks(batch, actor.eos_ids, actor.pad_id)
    # completions are the decoded real tokens
    for ids, mask, text in zip(batch.response_ids, batch.response_mask, batch.completions):
        assert actor.tokenizer.decode(ids[mask], skip_special_tokens=True) == text
    # sampling log-probs agree with a fresh forward pass of the same model (the learner's view)
    out = response_forward(
        PolicyWithValueHead(actor.model),
        torch.as_tensor(batch.prompt_ids),
        torch.as_tensor(batch.prompt_mask),
        torch.as_tensor(batch.response_ids),
        torch.as_tensor(batch.response_mask),
    )
    mask = torch.as_tensor(batch.response_mask)
    assert torch.allclose(out.logprobs[mask], torch.as_tensor(batch.logprobs)[mask], atol=1e-4)
    assert (torch.as_tensor(batch.logprobs)[~mask] == 0).all()
    assert (out.logprobs[mask] <= 0).all()
    # a group's completions sharing one prompt pass: the same log-probs and gradients
    net = PolicyWithValueHead(actor.model)
    args = [
        torch.as_tensor(x)
        for x in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    ]
    grads = []
    for share in (False, True):
        net.zero_grad()
        got = response_forward(net, *args, share_prompts=share).logprobs
        torch.testing.assert_close(got[mask], out.logprobs[mask], atol=1e-5, rtol=1e-5)
        (got * mask * torch.linspace(-1, 1, len(got))[:, None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_temperature_scales_logprobs(model_dir: Path) -> None:
    actor = _actor(model_dir, temperature=0.5)
    batch = actor.generate(_prompts(actor))
    out = response_forward(
        PolicyWithValueHead(actor.model),
        *(
            torch.as_tensor(x)
            for x in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        ),
        temperature=0.5,
    )
    mask = torch.as_tensor(batch.response_mask)
    assert torch.allclose(out.logprobs[mask], torch.as_tensor(batch.logprobs)[mask], atol=1e-4)


def test_sampled_logprobs_recorder_by_hand() -> None:
    """Step t's log-softmax is gathered at the token found in input_ids at step t + 1."""
    rec = SampledLogprobs(temperature=2.0)
    step_logits = [torch.tensor([[0.0, 2.0], [4.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 0.0]])]
    response = torch.tensor([[1, 0], [0, 1]])  # the sampled tokens
    prompt = torch.tensor([[5], [5]])
    for t, logits in enumerate(step_logits):
        ids = torch.cat([prompt, response[:, :t]], dim=1)
        assert rec(ids, logits) is logits  # the logits go on unchanged
    got = rec.finish(response)
    # log softmax([0, 1]) at 1 = -log(1 + e^-1); log softmax([2, 0]) at 0 = -log(1 + e^-2)
    want = torch.tensor(
        [[-np.log1p(np.exp(-1.0)), -np.log(2.0)], [-np.log1p(np.exp(-2.0)), -np.log(2.0)]]
    )
    torch.testing.assert_close(got, want.float())
    assert rec.step_logps is None and rec.taken == []  # ready for the next generate call


def test_draw_samples_the_categorical_distribution() -> None:
    """The two-level inverse CDF draws each token with its probability (a chi-square test
    against 400k draws, beside torch.multinomial's statistic), never a zero-probability
    token, and picks the only token of a one-hot row whichever block it sits in."""
    torch.manual_seed(0)
    logits = torch.randn(2, 1000) * 2
    logits[:, [5, 999]] = float("-inf")  # a zero in the middle and at the padded end
    probs = torch.softmax(logits, -1)
    draws = draw(probs.repeat(200_000, 1), block=64).view(-1, 2)  # 1000 = 15 blocks + 40
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=1000).float()
        expected = probs[row] * draws.shape[0]
        assert counts[5] == counts[999] == 0
        kept = expected > 5
        chi2 = (((counts - expected) ** 2 / expected)[kept]).sum().item()
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # ~5 sigma
    one_hot = torch.zeros(3, 10)
    one_hot[0, 9] = one_hot[1, 0] = 1.0
    one_hot[2, 3] = one_hot[2, 7] = 0.5
    drawn = draw(one_hot.repeat(500, 1), block=4).view(-1, 3)
    assert (drawn[:, 0] == 9).all() and (drawn[:, 1] == 0).all()
    assert set(drawn[:, 2].tolist()) == {3, 7}


def test_a_drawing_recorder_is_what_generate_takes(model_dir: Path) -> None:
    """With top_p = 1 the recorder draws each token (generate runs its argmax over scores
    that are -inf but at the draw) and records log softmax(logits / T) of it."""
    actor = _actor(model_dir, temperature=0.7, max_new_tokens=6)
    assert actor._draws_itself() and not actor._generation_config(False, 6).do_sample
    torch.manual_seed(3)
    tokens, real, scores = generate_with_drawing_recorder(actor, _prompts(actor), 4, 0.7)
    taken = scores.argmax(-1)
    assert torch.equal(taken[real], tokens[real])
    assert len({tuple(r) for r in tokens.tolist()}) > 4  # sampled, not greedy


def test_logprobs_are_of_the_tempered_policy_under_top_p(model_dir: Path) -> None:
    """top-p truncates sampling, not the recorded log-probs: log softmax(logits / T), as the
    learner computes them (and no [B, T, V] logits are kept to get them)."""
    actor = _actor(model_dir, temperature=0.7, top_p=0.5)
    batch = actor.generate(_prompts(actor))
    out = response_forward(
        PolicyWithValueHead(actor.model),
        *(
            torch.as_tensor(x)
            for x in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        ),
        temperature=0.7,
    )
    mask = torch.as_tensor(batch.response_mask)
    assert torch.allclose(out.logprobs[mask], torch.as_tensor(batch.logprobs)[mask], atol=1e-4)


def test_generation_stops_at_eos(model_dir: Path) -> None:
    actor = _actor(model_dir, num_samples=4)
    # Treat half the vocabulary as EOS so completions end at different lengths.
    actor.eos_ids = list(range(0, len(actor.tokenizer), 2))
    batch = actor.generate(_prompts(actor) * 4)
    lengths = batch.response_mask.sum(1)
    assert lengths.min() >= 1 and len(set(lengths.tolist())) > 1
    _check_eos_masks(batch, actor.eos_ids, actor.pad_id)


def test_generation_chunks_and_greedy(model_dir: Path) -> None:
    actor = _actor(model_dir, generation_batch_size=4)  # 3 samples -> one prompt per generate call
    batch = actor.generate(_prompts(actor))
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    greedy = actor.generate(_prompts(actor), greedy=True)
    again = actor.generate(_prompts(actor), greedy=True)
    assert greedy.group_size == 1 and len(greedy) == len(PROMPTS)
    assert greedy.completions == again.completions  # argmax decoding is deterministic


def test_weight_sync_changes_outputs_and_version(model_dir: Path, other_model_dir: Path) -> None:
    actor = _actor(model_dir)
    other = _actor(other_model_dir)
    prompts = _prompts(actor)

    def sampled(a: GenerationActor) -> GenerationBatch:
        torch.manual_seed(123)  # same sampling noise: any difference comes from the weights
        return a.generate(prompts)

    before = sampled(actor)
    assert actor.set_weights({k: v.clone() for k, v in other.model.state_dict().items()}, 7) == 7
    after = sampled(actor)
    assert (
        actor.get_version() == 7
        and after.policy_version == 7
        and before.policy_version == UNSYNCED_VERSION
    )
    assert after.completions == sampled(other).completions
    assert after.completions != before.completions


def test_reward_errors_name_the_sample(model_dir: Path) -> None:
    actor = _actor(model_dir)
    prompts = _prompts(actor)
    prompts[2] = Prompt(prompts[2].text, prompts[2].ids, {"no_answer": 1})
    with pytest.raises(RewardError, match=r"sample 6 \(prompt '5\+7='\).*no 'answer'"):
        actor.sample(prompts)

    def wrong_length(prompts, completions, metadata):
        return [1.0]

    actor.reward_fn = wrong_length
    with pytest.raises(RewardError, match="wrong number of rewards: expected 12"):
        actor.sample(_prompts(actor))

    def nan_reward(prompts, completions, metadata):
        return [float("nan")] * len(prompts)

    actor.reward_fn = nan_reward
    with pytest.raises(RewardError, match=r"returned nan for sample 0"):
        actor.sample(_prompts(actor))


def test_concat_pads_and_offsets_groups(model_dir: Path) -> None:
    actor = _actor(model_dir)
    a = actor.sample(_prompts(actor)[:1])  # short prompt
    b = actor.sample(_prompts(actor)[1:2])  # longer prompt
    a.policy_version, b.policy_version = 3, 2
    both = GenerationBatch.concat([a, b])
    assert both.prompt_ids.shape[1] == max(a.prompt_ids.shape[1], b.prompt_ids.shape[1])
    assert both.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert both.policy_version == 2
    # left padding preserved: the last column is always a real prompt token
    assert both.prompt_mask[:, -1].all()
    assert both.num_tokens == a.num_tokens + b.num_tokens
    assert both.episodes.returns == [*a.rewards.tolist(), *b.rewards.tolist()]


@pytest.mark.parametrize("prefix", ["", "Sum it: "])
def test_prefill_without_repeats_is_the_plain_generate(model_dir: Path, prefix: str) -> None:
    """Each prompt's prefill once per group, and a prefix all prompts share once: the same
    tokens as ``generate`` over the left-padded prompts repeated n times (what
    ``num_return_sequences`` does), greedy and sampled with the same seed (both draw one
    ``[k n, V]`` sample per step), and log-probs the learner's forward agrees with."""
    actor = _actor(model_dir, max_new_tokens=5)
    rows = [actor.tokenizer(prefix + t)["input_ids"] for t in PROMPTS]
    assert common_prefix_len(rows) == len(prefix)  # 8 characters: the shared pass runs
    width = max(map(len, rows))
    ids = torch.tensor([[actor.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    for greedy, n in ((True, 1), (True, 3), (False, 3)):
        config = actor._generation_config(greedy, 5)
        torch.manual_seed(7)
        plain = actor.model.generate(
            input_ids=ids.repeat_interleave(n, 0),
            attention_mask=mask.repeat_interleave(n, 0),
            generation_config=config,
            logits_processor=LogitsProcessorList([actor._recorder(greedy)] if not greedy else []),
        ).sequences[:, width:]
        torch.manual_seed(7)
        processors = LogitsProcessorList([actor._recorder(greedy)] if not greedy else [])
        fast = prefilled_generate(actor.model, rows, n, config, processors, actor.pad_id)
        assert fast.shape == plain.shape == (4 * n, 5)
        assert torch.equal(fast, plain), f"greedy={greedy} n={n}"
    assert len({tuple(r) for r in fast.tolist()}) > 4  # the samples differ
    batch = actor.generate([Prompt(prefix + t, r, {}) for t, r in zip(PROMPTS, rows)])
    out = response_forward(
        PolicyWithValueHead(actor.model),
        *(
            torch.as_tensor(x)
            for x in (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
        ),
    )
    real = torch.as_tensor(batch.response_mask)
    torch.testing.assert_close(
        out.logprobs[real], torch.as_tensor(batch.logprobs)[real], atol=1e-5, rtol=1e-5
    )


def test_common_prefix_len_keeps_a_token_per_row() -> None:
    assert common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 1  # the shorter row keeps its last token
    assert common_prefix_len([[5, 2], [1, 2]]) == 0
