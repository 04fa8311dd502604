"""The KV cache of multi-turn episodes, kept from one model turn to the next.

Without it every turn re-reads the whole conversation: on ToolArithmetic the second
turn's prefill (about 30 episodes x 60-100 tokens, left-padded to the longest) fed the
tiny model twice the tokens the first turn decoded, the largest cost of a multi-turn
batch after its decode steps (``benchmarks/agent_tools.py``'s throughput section). With
it a turn feeds only what is new since the last one: the previous turn's last sampled
token and the environment's reply.

How (transformers ``generate``): the rows of a turn are the previous turn's rows
``sequences`` (every token fed or sampled, padding included) with the reply of each
row appended *left-padded* in a block, so every row's last real token sits in the last
column. ``mask`` is 0 on every pad: the prompts' left padding, the tokens sampled after
an EOS, the reply block's padding. ``generate`` derives position ids from the mask's
cumulative sum, so a real token keeps the position it has in the unpadded conversation,
and attention skips the pads: the logits (hence tokens and log-probs) are those of the
re-read conversation (``tests/test_agent_rollout.py`` checks greedy episodes token for
token and sampled log-probs against a full forward pass). Episodes that ended are
dropped from the cache (``batch_select_indices``).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from rlft_ray.config import LMConfig
from rlft_ray.lm.policy import cache_kwarg
from rlft_ray.types import GenerationBatch, Prompt, pad_sequences


@dataclass
class CachedTurns:
    """The state after one turn.

    Attributes:
        keys: ``[B]`` the episode each row belongs to.
        sequences: ``[B, T]`` every token fed or sampled so far (pads included).
        mask: ``[B, T]`` 1 on the real tokens of each conversation.
        cache: The model's KV cache of ``sequences[:, :-1]`` (transformers ``Cache``).
    """

    keys: list[int]
    sequences: torch.Tensor
    mask: torch.Tensor
    cache: Any


@dataclass
class TurnSession:
    """One batch of episodes' cache across its turns (:meth:`GenerationActor.generate_turn`).

    Attributes:
        state: The cache after the last turn; None before the first or after a turn that
            could not reuse it.
        fed_tokens: Token columns x rows the model read in prefills (padding included).
        reused_turns: Turns that continued the cache instead of re-reading everything.
        shared_rows: Rows whose new tokens another identical row read for them
            (:func:`shared_prefill`).
        park_below: Park a call's unfinished turns once at most this fraction of its
            rows still runs (:class:`TurnStops`; 0: every call runs to its last row).
            A call of parked turns alone is not parked again: nothing else would start.
        parked_rows: Parks, summed over calls (a turn parked twice counts twice).
        parked_keys: The episodes whose turn the last call parked.
    """

    state: CachedTurns | None = None
    fed_tokens: int = 0
    reused_turns: int = 0
    shared_rows: int = 0
    park_below: float = 0.0
    parked_rows: int = 0
    parked_keys: set[int] = field(default_factory=set)

    def inputs(
        self, contexts: Sequence[Prompt], keys: Sequence[int], pad_id: int, device: Any
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(input_ids, attention_mask, cache)`` for the next turn of ``contexts``:
        the cached rows continued where every context extends its row's conversation
        (or, a parked turn, equals it), else the contexts left-padded from scratch
        (cache None)."""
        state, self.state = self.state, None
        if state is not None:
            rows = {k: i for i, k in enumerate(state.keys)}
            if all(k in rows for k in keys):
                sel = torch.as_tensor([rows[k] for k in keys], device=state.sequences.device)
                seq, mask = state.sequences[sel], state.mask[sel]
                tails = []
                seq_rows, mask_rows = seq.tolist(), mask.tolist()  # one copy, not one per row
                for r, context in enumerate(contexts):
                    known = list(itertools.compress(seq_rows[r], mask_rows[r]))
                    if len(context.ids) < len(known) or context.ids[: len(known)] != known:
                        break
                    if len(context.ids) == len(known):  # a parked turn goes on
                        if not mask_rows[r][-1]:  # an ended turn and an empty reply:
                            break  # nothing new to read, so everything is re-read
                        # Its last sampled token (the last column, not in the cache yet)
                        # moves to the block's last column: that is where generate reads
                        # the next token's logits. Its old column becomes a pad.
                        mask[r, -1] = 0
                        tails.append(known[-1:])
                        continue
                    tails.append(context.ids[len(known) :])
                else:
                    if len(sel) != len(state.keys) or bool((sel != torch.arange(len(sel))).any()):
                        state.cache.batch_select_indices(sel)
                    block, block_mask = pad_sequences(tails, pad_id, "left")
                    ids = torch.cat([seq, torch.as_tensor(block, device=device)], dim=1)
                    mask = torch.cat([mask, torch.as_tensor(block_mask, device=device).long()], 1)
                    self.reused_turns += 1
                    self.fed_tokens += len(keys) * (block.shape[1] + 1)
                    return ids, mask, state.cache
        ids, mask = pad_sequences([c.ids for c in contexts], pad_id, "left")
        self.fed_tokens += int(np.prod(ids.shape))
        return (
            torch.as_tensor(ids, device=device),
            torch.as_tensor(mask, device=device).long(),
            None,
        )

    def keep(
        self,
        keys: Sequence[int],
        sequences: torch.Tensor,
        mask: torch.Tensor,
        response_mask: torch.Tensor,
        cache: Any,
    ) -> None:
        """Remember a turn's rows: ``mask`` of what was fed, ``response_mask`` of the
        sampled tokens that are real (up to and including EOS)."""
        self.state = CachedTurns(
            list(keys), sequences, torch.cat([mask, response_mask.long()], dim=1), cache
        )


#: Park the turns still running once at most this fraction of a call's rows runs
#: (``benchmarks/agent_tools.py``'s throughput section).
PARK_BELOW = 0.25


class TurnStops(StoppingCriteria):
    """Where each row of a turn's ``generate`` call stops: at EOS, at the row's own token
    cap, or parked.

    Parking is continuous batching at the turn level. A call runs until its last row
    ends, and a decode step over 64 rows of a small model costs little more than one over
    a few, so the few long turns of a batch leave the other rows' next turns waiting (on
    ToolArithmetic one rambling answer in 64 made a 7-step turn last 24 steps).
    Once at most ``park_below`` of the rows still run, the call ends; those turns are
    *parked* (``parked``: ``[B]`` bool) and go on in the next call beside the next turns
    of the rows that ended or, where those episodes ended, in a call of their own whose
    steps cost less than the full batch's (:meth:`TurnSession.inputs` continues their
    cache; the rows of ended episodes are dropped from it).

    Args:
        width: Columns of the call's input (the sampled tokens start after them).
        caps: ``[B]`` int, each row's new-token cap.
        eos_ids: ``[E]`` int, the token ids that end a turn.
        park_below: Park once at most this fraction of the rows runs (0: never).
        ended: ``[B]`` bool, rows already done when the call starts (their first token,
            drawn before it, was EOS or their cap); default none.
    """

    def __init__(
        self,
        width: int,
        caps: torch.Tensor,
        eos_ids: torch.Tensor,
        park_below: float,
        ended: torch.Tensor | None = None,
    ) -> None:
        self.width, self.caps, self.eos_ids = width, caps, eos_ids
        # Parking needs at least one running row at or below the threshold.
        self.park_below = park_below if park_below * len(caps) >= 1 else 0.0
        self.first_cap = int(caps.min())
        if ended is None:
            ended = torch.zeros(len(caps), dtype=torch.bool, device=caps.device)
        self.ended = ended
        self.parked: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """``[B]`` bool, the rows that are done after the token just sampled (every row
        once the call parks); ``input_ids`` ``[B, width + sampled]``."""
        if self.parked is not None:  # sticky: a deferred extra step changes nothing
            return torch.ones_like(self.ended)
        sampled = input_ids.shape[1] - self.width
        self.ended = self.ended | torch.isin(input_ids[:, -1], self.eos_ids)
        if sampled >= self.first_cap:  # (a few tensor ops a step: only where they can bite)
            self.ended |= sampled >= self.caps
        if self.parks():
            return torch.ones_like(self.ended)
        return self.ended

    def parks(self) -> bool:
        """Whether the call parks now (at most ``park_below`` of the rows still run, at
        least one does); sets :attr:`parked`. Also asked before ``generate`` where rows
        were ``ended`` by a first token drawn before it."""
        if self.park_below > 0:
            running = len(self.ended) - int(self.ended.sum())
            if 0 < running <= self.park_below * len(self.ended):
                self.parked = ~self.ended
        return self.parked is not None


#: Share a prefill only when at most this fraction of the rows is distinct (an extra
#: forward call costs about one decode step).
SHARE_BELOW = 0.75


def shared_prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, through_last: bool = False
) -> tuple[int, torch.Tensor | None]:
    """Read the new columns of ``ids`` (all but the last; with ``through_last`` the last
    too) into ``cache`` once per distinct row, and copy the result to the row's
    duplicates; returns the rows spared and, with ``through_last``, the last column's
    logits ``[B, V]`` float32 (None when nothing was shared).

    Rows whose padded tokens and mask are equal have equal KV caches (the same tokens at
    the same positions, the same pads): the episodes of a GRPO group start from one
    prompt, and a policy that has learnt its tool call samples the same call in most of
    them, so the environment's reply lands on identical conversations. Without this, each
    copy re-reads the reply: on ToolArithmetic that prefill (64 rows x 26 tokens) cost as
    much as 13 decode steps. Without ``through_last``, ``generate`` then reads the last
    column itself (and samples from its logits) as it would after any cached prefix; with
    it the caller samples from the returned logits. Nothing is shared when most rows are
    distinct (:data:`SHARE_BELOW`) or there is at most one new column.
    """
    past, width = cache.get_seq_length(), ids.shape[1]
    if width - past < 3:
        return 0, None
    rows, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    distinct = rows.shape[0]
    if distinct > SHARE_BELOW * ids.shape[0]:
        return 0, None
    first = torch.full((distinct,), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.shape[0], device=ids.device), "amin")
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
    end = width if through_last else width - 1
    cache.batch_select_indices(first)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = model(
        input_ids=ids[first, past:end],
        attention_mask=mask[first, :end],
        position_ids=positions[first, past:end],
        use_cache=True,
        **{cache_kwarg(base): cache},
        **({"logits_to_keep": 1} if _forward_takes(type(base), "logits_to_keep") else {}),
    )
    cache.batch_select_indices(inverse)
    last = out.logits[inverse, -1].float() if through_last else None
    return ids.shape[0] - distinct, last


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    """Whether a model class's ``forward`` takes ``name`` (``logits_to_keep``: only the
    last column's logits are computed, the one a turn's first token is sampled from)."""
    return name in inspect.signature(cls.forward).parameters


class TurnCaching:
    """:class:`~rlft_ray.rollout.generation.GenerationActor`'s multi-turn generation
    (a mixin: it uses the actor's model, generation settings and batch building)."""

    lm: LMConfig
    device: torch.device
    model: Any
    engine: Any
    pad_id: int
    max_positions: int | None

    @torch.no_grad()
    def generate_turn(
        self,
        contexts: Sequence[Prompt],
        session: TurnSession,
        greedy: bool = False,
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> GenerationBatch:
        """One model turn of multi-turn episodes: one completion per context, continuing
        ``session``'s KV cache where each context extends its episode's conversation
        (``context.metadata["episode"]`` names the episode; see
        :mod:`rlft_ray.rollout.turn_cache`). The vLLM engine (its own prefix cache and
        continuous batching), value-guided decoding and batches over
        ``lm.generation_batch_size`` use
        :meth:`~rlft_ray.rollout.generation.GenerationActor.generate` (every turn re-read,
        nothing parked, every row up to the largest cap: the caller cuts).

        Args:
            contexts: Each episode's conversation so far (token ids).
            session: The batch's cache across turns and its parking threshold.
            greedy: Argmax decoding.
            max_new_tokens: New tokens at most, one cap for every context or one per
                context (a parked turn's remaining tokens); default ``lm.max_new_tokens``.

        Returns:
            As :meth:`~rlft_ray.rollout.generation.GenerationActor.generate` with one
            sample per context; ``unfinished`` marks the parked turns (:class:`TurnStops`).
        """
        caps = self._turn_caps(contexts, max_new_tokens)
        if (
            self.engine is not None
            or self.lm.decode == "ilql"
            or not contexts
            or len(contexts) > self.lm.generation_batch_size
        ):
            session.state = None
            return self.generate(contexts, 1, greedy, max(caps, default=self.lm.max_new_tokens))
        start = time.perf_counter()
        keys = [int(c.metadata["episode"]) for c in contexts]
        ids, mask, cache = session.inputs(contexts, keys, self.pad_id, self.device)
        caps_t = torch.as_tensor(caps, device=self.device)
        recorder = self._recorder(greedy)
        only_parked = set(keys) <= session.parked_keys  # nothing new would start
        park_below = 0.0 if only_parked else session.park_below
        sequences, cache, stops = self._decode_turn(
            ids, mask, cache, caps_t, recorder, greedy, park_below, session
        )
        response, real, logprobs = self._real_tokens(sequences[:, ids.shape[1] :], recorder)
        within = torch.arange(response.shape[1], device=response.device) < caps_t[:, None]
        real &= within  # a row stopped at its own cap: what generate appended is padding
        session.keep(keys, sequences, mask, real, cache)
        prompt_ids, prompt_mask = pad_sequences([c.ids for c in contexts], self.pad_id, "left")
        batch = self._batch(
            list(contexts),
            1,
            prompt_ids,
            prompt_mask,
            response.masked_fill(~within, self.pad_id).cpu().numpy(),
            real.cpu().numpy(),
            logprobs.masked_fill(~within.to(logprobs.device), 0.0).cpu().numpy().astype(np.float32),
        )
        session.parked_keys = set()
        if stops.parked is not None:
            batch.unfinished = stops.parked.cpu().numpy()
            session.parked_rows += int(stops.parked.sum())
            session.parked_keys = {k for k, p in zip(keys, batch.unfinished.tolist()) if p}
        batch.generate_s = time.perf_counter() - start
        return batch

    def _decode_turn(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        caps: torch.Tensor,
        recorder: Any,
        greedy: bool,
        park_below: float,
        session: TurnSession,
    ) -> tuple[torch.Tensor, Any, TurnStops]:
        """Decode a turn from ``ids`` / ``mask`` ``[B, W]`` (continuing ``cache``, or from
        scratch); returns (``sequences`` ``[B, W + R]``, their cache of all but the last
        column, the call's :class:`TurnStops`).

        Where the new columns are shared (:func:`shared_prefill`: equal conversations),
        the shared forward reads the last column too and the first token is drawn here
        from its logits, by the recorder (or argmax) exactly as ``generate``'s first step
        would: ``generate`` then starts with a decode step, not with a forward of one
        column over every row (on ToolArithmetic about 8 ms of a 200 ms batch).
        """
        eos = torch.as_tensor(self.eos_ids, dtype=torch.long, device=self.device)
        first = None  # [B, 1] the first token, drawn here
        if cache is not None:
            new_columns = ids.shape[1] - 1 - cache.get_seq_length()
            here = recorder is None or recorder.draws  # no warper of generate's to mirror
            spared, last = shared_prefill(self.model, ids, mask, cache, through_last=here)
            session.shared_rows += spared
            session.fed_tokens -= spared * (new_columns + int(last is not None))
            if last is not None:
                first = (last if recorder is None else recorder(ids, last)).argmax(-1, True)
        if first is None:
            inputs, rest, ended = ids, caps, None
        else:
            inputs, rest = torch.cat([ids, first], dim=1), caps - 1
            ended = torch.isin(first[:, 0], eos) | (rest <= 0)
            mask = torch.cat([mask, torch.ones_like(first)], dim=1)
        stops = TurnStops(inputs.shape[1], rest, eos, park_below, ended)
        if ended is not None and (bool(ended.all()) or stops.parks()):
            return inputs, cache, stops  # every row ended at its first token, or few run on
        out = self.model.generate(
            input_ids=inputs,
            attention_mask=mask,
            generation_config=self._generation_config(greedy, int(rest.max())),
            logits_processor=None if recorder is None else LogitsProcessorList([recorder]),
            stopping_criteria=StoppingCriteriaList([stops]),
            **({} if cache is None else {cache_kwarg(self.model): cache}),
        )
        return out.sequences, out.cache, stops

    def _turn_caps(
        self, contexts: Sequence[Prompt], max_new_tokens: int | Sequence[int] | None
    ) -> list[int]:
        """Each context's new-token cap, at most the model's positions left after it.

        Args:
            contexts: The call's contexts.
            max_new_tokens: One cap for all, one per context, or None
                (``lm.max_new_tokens``).

        Returns:
            ``len(contexts)`` caps.

        Raises:
            ValueError: A context already fills the model's positions.
        """
        cap = self.lm.max_new_tokens if max_new_tokens is None else max_new_tokens
        caps = [int(cap)] * len(contexts) if np.ndim(cap) == 0 else [int(c) for c in cap]
        if self.max_positions is None:
            return caps
        for c in contexts:
            if len(c.ids) >= self.max_positions:
                raise ValueError(
                    f"a context of {len(c.ids)} tokens leaves no room in the model's "
                    f"{self.max_positions} positions"
                )
        return [min(n, self.max_positions - len(c.ids)) for n, c in zip(caps, contexts)]
