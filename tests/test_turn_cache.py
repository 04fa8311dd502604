"""The KV cache kept across the turns of multi-turn episodes and parking (continuous
batching at the turn level): the tokens and log-probs of re-reading every conversation,
shared prefills, per-row caps, parked turns continued where they stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_agent_rollout import LIMITS, LOGP, TOK, calculator_user, scripted

from envs.tool_arithmetic import ToolArithmeticEnv
from rlft_ray.agents import TextEnv
from rlft_ray.config import LMConfig
from rlft_ray.rollout.generation import GenerationActor
from rlft_ray.rollout.multiturn import TurnLimits, run_episodes
from rlft_ray.rollout.turn_cache import TurnSession
from rlft_ray.types import GenerationBatch, Prompt


class _EndsAfterSeedModTurns(TextEnv):
    """Ends after ``seed % 3 + 1`` model turns, whatever the model writes; replies of
    different lengths (the cache's reply block is padded)."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed, self.left = seed, seed % 3 + 1
        return "go:", {}

    def step(self, action):
        self.left -= 1
        return f" next{'!' * (self.seed % 4)}:", 0.0, self.left == 0, False, {}


def _episodes(
    actor: GenerationActor, session: TurnSession, greedy: bool, limits: TurnLimits
) -> GenerationBatch:
    """2 episodes from each of the reset seeds 0-5 of :class:`_EndsAfterSeedModTurns`,
    every turn through ``actor.generate_turn`` in ``session`` (torch seeded alike)."""
    torch.manual_seed(3)
    return run_episodes(
        lambda c, n: actor.generate_turn(c, session, greedy, n),
        actor.tokenizer,
        _EndsAfterSeedModTurns,
        range(6),
        2,
        limits,
    )


class _NoCache(TurnSession):
    def keep(self, *args) -> None:  # every turn re-reads the whole conversation
        pass


@pytest.mark.parametrize("greedy", [True, False])
def test_the_turn_cache_gives_the_tokens_of_rereading_the_conversation(
    model_dir: Path, greedy: bool
) -> None:
    """Episodes continued from the previous turn's KV cache (rows of ended episodes
    dropped) equal those that re-read the conversation every turn: greedy token for token,
    sampled (same seed) token for token with the same log-probs."""
    lm = LMConfig(model=str(model_dir), max_new_tokens=5, max_turns=4)
    actor = GenerationActor(lm, seed=0)
    limits = TurnLimits(max_turns=4, max_new_tokens=5, max_tokens=60, step_timeout_s=5.0)
    sessions = [TurnSession(), _NoCache()]
    cached, reread = (_episodes(actor, session, greedy, limits) for session in sessions)
    assert cached.agent.turns.tolist() == [1, 1, 2, 2, 3, 3] * 2
    assert np.array_equal(cached.response_ids, reread.response_ids)
    assert np.array_equal(cached.loss_mask, reread.loss_mask)
    assert np.allclose(cached.logprobs, reread.logprobs, atol=1e-5)
    assert sessions[0].reused_turns == 2 and sessions[1].reused_turns == 0
    assert sessions[0].fed_tokens < 0.6 * sessions[1].fed_tokens  # 144 vs 280 tokens read
    assert greedy or (cached.logprobs < 0).any()
    # greedy, every reset "go:": equal replies make equal conversations, read once each
    # (turn 2: 8 rows, 3 distinct; turn 3: 4 rows, 2 distinct); sampled turns differ
    assert sessions[0].shared_rows == (5 + 2 if greedy else 0)


def test_turn_stops_caps_each_row_and_parks_the_last_runners() -> None:
    """By hand: 4 rows, EOS id 0, caps [2, 5, 5, 5], park below 0.5 (2 rows)."""
    from rlft_ray.rollout.turn_cache import TurnStops

    stops = TurnStops(3, torch.tensor([2, 5, 5, 5]), torch.tensor([0]), park_below=0.5)
    ids = torch.ones(4, 3, dtype=torch.long)  # the 3 input columns
    step = lambda tokens: torch.cat([ids, torch.tensor(tokens)], dim=1)  # noqa: E731
    ids = step([[7], [7], [0], [7]])  # row 2 samples EOS
    assert stops(ids, None).tolist() == [False, False, True, False] and stops.parked is None
    ids = step([[7], [7], [0], [7]])  # row 0 reaches its cap of 2: 2 rows still run
    assert stops(ids, None).tolist() == [True] * 4
    assert stops.parked.tolist() == [False, True, False, True]
    assert stops(step([[0]] * 4), None).tolist() == [True] * 4  # parked stays parked
    # rows ended by a first token drawn before generate: the call parks before it starts
    first = TurnStops(
        4,
        torch.tensor([4, 4, 4, 4]),
        torch.tensor([0]),
        0.5,
        ended=torch.tensor([True, True, False, True]),
    )
    assert first.parks() and first.parked.tolist() == [False, False, True, False]
    assert not TurnStops(
        4, torch.tensor([4] * 4), torch.tensor([0]), 0.5, torch.tensor([True, False, False, False])
    ).parks()
    never = TurnStops(0, torch.tensor([3, 3]), torch.tensor([0]), park_below=0.0)
    assert never(torch.tensor([[0], [5]]), None).tolist() == [True, False]  # 1 of 2 runs
    assert never.parked is None


def test_parked_turns_are_recorded_as_one_turn_with_their_remaining_cap() -> None:
    """A generate that parks every odd episode's turn after 3 tokens: the episodes equal
    those of one that never parks (ids, loss mask, log-probs, rewards, turns, texts); the
    next call gives a parked turn what is left of its cap; a parked turn is not stepped."""
    plain = scripted(calculator_user)
    pending: dict[int, list[int]] = {}
    caps_seen: list[list[int]] = []

    def parking(prompts: list[Prompt], max_new: list[int]) -> GenerationBatch:
        caps_seen.append(list(max_new))
        batch = plain(prompts, max_new)
        parked = np.zeros(len(prompts), bool)
        for row, p in enumerate(prompts):
            episode, real = p.metadata["episode"], batch.response_mask[row]
            if episode in pending:  # a parked turn goes on: sample the rest
                ids = pending.pop(episode)
            elif episode % 2 and real.sum() > 3:
                ids = batch.response_ids[row][real].tolist()
                pending[episode], parked[row] = ids[3:], True
                ids = ids[:3]
            else:
                continue
            batch.response_ids[row], batch.response_mask[row] = TOK.pad_token_id, False
            batch.response_ids[row, : len(ids)], batch.response_mask[row, : len(ids)] = ids, True
            batch.logprobs[row] = np.where(batch.response_mask[row], LOGP, 0.0)
            batch.completions[row] = "parked" if parked[row] else "decoded by run_episodes"
        batch.unfinished = parked
        return batch

    seeds = [0, 1]
    reference = run_episodes(plain, TOK, ToolArithmeticEnv, seeds, 2, LIMITS)
    batch = run_episodes(parking, TOK, ToolArithmeticEnv, seeds, 2, LIMITS)
    assert len(plain.calls) == 2 + 2 * 2  # per turn: the call that parks, the one after
    assert caps_seen[1] == [30, 30 - 3, 30, 30 - 3]  # the parked rows' remaining cap
    for name in ("response_ids", "response_mask", "loss_mask", "logprobs", "step_rewards"):
        assert np.array_equal(getattr(batch, name), getattr(reference, name)), name
    assert batch.rewards.tolist() == [1.0] * 4 and batch.completions == reference.completions
    assert batch.agent.turns.tolist() == [2] * 4 and batch.agent.tool_calls.tolist() == [1] * 4


def test_parking_continues_the_cache_as_rereading_does(model_dir: Path) -> None:
    """Sampled episodes of a model prone to EOS (turns of many lengths) with parked turns:
    the cached run equals the one re-reading every call, token for token with the same
    log-probs, and every model turn stays within ``max_new_tokens``."""
    lm = LMConfig(model=str(model_dir), max_new_tokens=8, max_turns=4)
    actor = GenerationActor(lm, seed=0)
    eos = actor.eos_ids[0]

    def eos_prone(module, args, logits):  # + 2 on EOS's logit: short and long turns
        logits = logits.clone()
        logits[..., eos] += 2.0
        return logits

    actor.model.get_output_embeddings().register_forward_hook(eos_prone)
    limits = TurnLimits(max_turns=4, max_new_tokens=8, max_tokens=60, step_timeout_s=5.0)
    sessions = [TurnSession(park_below=0.5), _NoCache(park_below=0.5)]
    cached, reread = (_episodes(actor, session, False, limits) for session in sessions)
    assert sessions[0].parked_rows == sessions[1].parked_rows > 0
    assert sessions[0].reused_turns > 2  # parked calls continued the cache too
    assert np.array_equal(cached.response_ids, reread.response_ids)
    assert np.array_equal(cached.loss_mask, reread.loss_mask)
    assert np.allclose(cached.logprobs, reread.logprobs, atol=1e-5)
    assert cached.agent.turns.tolist() == [1, 1, 2, 2, 3, 3] * 2
    for row in cached.loss_mask:  # each model turn: a run of trained tokens
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0])))[::2]
        assert (runs <= 8).all()


def test_a_parked_greedy_row_samples_what_it_would_have_unparked(model_dir: Path) -> None:
    """Rows with caps [2, 2, 2, 8]: once three end, the fourth (1 of 4 running) is parked
    after 2 tokens; continued in the next call (cap 6) beside the others' next turns, it
    samples the 8 tokens one uninterrupted call gives it."""
    actor = GenerationActor(LMConfig(model=str(model_dir), max_new_tokens=8), seed=0)
    contexts = [
        Prompt("", actor.tokenizer(t)["input_ids"], metadata={"episode": i})
        for i, t in enumerate(["12+7=", "3*4=", "9-1=", "abcd"])
    ]
    whole = actor.generate_turn(contexts, TurnSession(), True, [8] * 4)
    assert whole.response_mask[3].all(), "row 3 needs 8 tokens without EOS for this test"
    session = TurnSession(park_below=0.25)
    first = actor.generate_turn(contexts, session, True, [2, 2, 2, 8])
    assert first.unfinished.tolist() == [False, False, False, True]
    assert first.response_ids[3, :2].tolist() == whole.response_ids[3, :2].tolist()
    reply = actor.tokenizer(" ok:")["input_ids"]
    later = [
        Prompt(
            "", c.ids + first.response_ids[i][first.response_mask[i]].tolist() + reply, c.metadata
        )
        for i, c in enumerate(contexts[:3])
    ]
    parked = contexts[3].ids + whole.response_ids[3, :2].tolist()
    session.park_below = 0.0  # this call runs to its last row
    second = actor.generate_turn(
        [*later, Prompt("", parked, contexts[3].metadata)], session, True, [4, 4, 4, 6]
    )
    assert session.reused_turns == 1  # the cache went on (the parked row's last token moved)
    assert second.unfinished is None and session.parked_rows == 1
    assert second.response_ids[3, :6].tolist() == whole.response_ids[3, 2:].tolist()
    fresh = actor.generate_turn(later, TurnSession(), True, [4] * 3)
    assert np.array_equal(second.response_ids[:3, :4], fresh.response_ids[:, :4])


def test_a_shared_prefill_gives_every_duplicate_row_the_cache_of_reading_it(
    model_dir: Path,
) -> None:
    """Rows that repeat another row (tokens and mask) get its KV cache copied instead of
    re-reading: the cache equals that of reading every row; mostly distinct rows are left
    to generate."""
    from transformers import DynamicCache

    from rlft_ray.rollout.turn_cache import shared_prefill

    model = GenerationActor(LMConfig(model=str(model_dir)), seed=0).model
    torch.manual_seed(0)
    distinct = torch.randint(5, 60, (3, 12))
    ids = distinct[[0, 1, 0, 2, 1, 0]]
    mask = torch.ones_like(ids)
    mask[[1, 4], :3] = 0  # left padding (rows 1 and 4 are still equal)
    caches = []
    for share in (True, False):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache)
            if share:
                assert shared_prefill(model, ids, mask, cache) == (3, None)  # 3 rows copied
            else:
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, 5:11]
                model(ids[:, 5:11], attention_mask=mask[:, :11], position_ids=pos, cache=cache)
        caches.append(cache)
    shared, read = (c.layers[0] for c in caches)
    assert shared.keys.shape == read.keys.shape == (6, 2, 11, 16)
    assert torch.allclose(shared.keys, read.keys, atol=1e-5)
    assert torch.allclose(shared.values, read.values, atol=1e-5)
    before = caches[1].get_seq_length()  # 6 distinct rows: nothing shared, nothing read
    assert shared_prefill(
        model, distinct[[0, 1, 2, 0, 1, 2]] + torch.arange(6)[:, None], mask, caches[1]
    ) == (0, None)
    assert caches[1].get_seq_length() == before


def test_turn_caps_per_row_within_the_models_positions(model_dir: Path) -> None:
    """One cap for all or one each (numpy ints too), each cut to the positions left after
    its context (the tiny model has 64); a context that fills them is refused."""
    actor = GenerationActor(LMConfig(model=str(model_dir), max_new_tokens=8), seed=0)
    short, long = Prompt("", [5] * 10), Prompt("", [5] * 60)
    assert actor._turn_caps([short, long], None) == [8, 4]
    assert actor._turn_caps([short, long], np.int64(6)) == [6, 4]
    assert actor._turn_caps([short, long], [3, 9]) == [3, 4]
    with pytest.raises(ValueError, match="a context of 64 tokens leaves no room"):
        actor._turn_caps([Prompt("", [5] * 64)], 8)


def test_the_uncached_fallback_cuts_rows_to_their_caps_and_matches(model_dir: Path) -> None:
    """Over ``lm.generation_batch_size`` a turn runs through ``generate`` (one cap for the
    call, nothing parked, nothing cached): run_episodes cuts every row to its own cap, and
    greedy episodes equal those of the cached, parking path. The 20-token budget leaves
    the second turns 3 to 5 tokens (replies of 6-9 tokens)."""
    limits = TurnLimits(max_turns=4, max_new_tokens=5, max_tokens=20, step_timeout_s=5.0)
    batches = []
    for batch_size in (64, 2):
        lm = LMConfig(model=str(model_dir), max_new_tokens=5, generation_batch_size=batch_size)
        actor = GenerationActor(lm, seed=0)
        session = TurnSession(park_below=0.5)
        batches.append(_episodes(actor, session, True, limits))
        assert (session.reused_turns > 0) == (batch_size == 64)
    cached, fallback = batches
    lengths = (cached.prompt_mask.sum(1) + cached.response_mask.sum(1)).tolist()
    assert max(lengths) == 20 and min(lengths) < 20  # the budget cut some turns short
    assert np.array_equal(cached.response_ids, fallback.response_ids)
    assert np.array_equal(cached.loss_mask, fallback.loss_mask)
    assert cached.completions == fallback.completions


def test_a_shared_turn_draws_its_first_token_from_the_shared_forward(model_dir: Path) -> None:
    """Sampled (temperature 0.001: the two episodes of a seed say the same), so the second
    and third turns share their prefill, read the last column too and draw the first token
    from its logits before ``generate``: the same tokens and log-probs as re-reading every
    conversation every turn, and the shared forward's last-column logits are those of
    reading every row."""
    from transformers import DynamicCache

    from rlft_ray.rollout.turn_cache import shared_prefill

    lm = LMConfig(model=str(model_dir), max_new_tokens=5, max_turns=4, temperature=0.001)
    actor = GenerationActor(lm, seed=0)
    limits = TurnLimits(max_turns=4, max_new_tokens=5, max_tokens=60, step_timeout_s=5.0)
    sessions = [TurnSession(), _NoCache()]
    cached, reread = (_episodes(actor, session, False, limits) for session in sessions)
    assert sessions[0].shared_rows > 0 and sessions[1].shared_rows == 0
    assert np.array_equal(cached.response_ids, reread.response_ids)
    assert np.array_equal(cached.loss_mask, reread.loss_mask)
    assert np.allclose(cached.logprobs, reread.logprobs, atol=1e-5)
    torch.manual_seed(0)
    ids = torch.randint(5, 60, (2, 12))[[0, 1, 0, 0]]
    mask = torch.ones_like(ids)
    logits = []
    for share in (True, False):
        cache = DynamicCache(config=actor.model.config)
        actor.model(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache)
        if share:
            spared, last = shared_prefill(actor.model, ids, mask, cache, through_last=True)
            assert spared == 2 and cache.get_seq_length() == 12
        else:
            pos = torch.arange(5, 12).expand(4, -1)
            out = actor.model(ids[:, 5:], attention_mask=mask, position_ids=pos, cache=cache)
            last = out.logits[:, -1].float()
        logits.append(last)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
