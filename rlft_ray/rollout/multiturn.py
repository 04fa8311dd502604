"""Multi-turn rollouts: an LM plays episodes of a text environment, many at once.

:func:`run_episodes` drives ``len(seeds) x samples_per_seed`` episodes (each seed's
``samples_per_seed`` episodes are one GRPO group: the same task). Every turn, all active
episodes generate in one batched call (``generate``); each model turn is then stepped in
its environment (concurrently, under ``step_timeout_s``) and the reply is tokenised once
and appended. A call may *park* a few long turns rather than keep every other row
waiting for them (:class:`~rlft_ray.rollout.turn_cache.TurnStops`): a parked turn keeps
its tokens, is not stepped, and goes on in the next call, capped at what is left of its
``max_new_tokens``. Token-in / token-out: a model turn keeps the sampled ids and their
log-probs exactly as sampled (no decode -> re-encode); the decoded text only goes to the
environment. An episode ends when the env terminates or truncates it, after
``max_turns`` model turns, when its tokens reach the budget, or when a step fails (times
out, raises, returns no text): a failed episode keeps its tokens, gets reward 0 and its
reason is recorded.

The result is a :class:`~rlft_ray.types.GenerationBatch` row per episode: the reset
observation is the prompt; the response is model turn 1, env reply 1, model turn 2, ...
(the final reply, which nothing continues, is left out); ``loss_mask`` marks the model's
tokens, ``step_rewards`` holds each turn's reward on the turn's last token, ``rewards``
their sum (what GRPO, RLOO and RSFT score an episode by), ``agent`` the per-episode
counts (turns, tool calls, truncation, failures).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from rlft_ray.agents.text_env import check_text_env, step_with_timeout
from rlft_ray.config import LMConfig
from rlft_ray.rollout import turn_cache
from rlft_ray.rollout.turn_cache import TurnSession
from rlft_ray.types import AgentStats, GenerationBatch, Prompt, pad_sequences

#: ``(contexts, max_new_tokens) -> GenerationBatch`` with one completion per context, at
#: most ``max_new_tokens[i]`` tokens for context ``i`` (longer rows are cut here):
#: ``response_ids``, ``response_mask`` (up to and including EOS), ``logprobs``,
#: ``completions`` (the real tokens decoded without special tokens: the env's action) and
#: optionally ``unfinished`` (parked turns). Each context's ``metadata["episode"]`` names
#: its episode (a KV cache kept across turns continues that episode's row:
#: :mod:`rlft_ray.rollout.turn_cache`).
Generate = Callable[[list[Prompt], list[int]], GenerationBatch]


@dataclass(frozen=True)
class TurnLimits:
    """When an episode stops.

    Attributes:
        max_turns: Model turns at most (``lm.max_turns``).
        max_new_tokens: Tokens per model turn at most (``lm.max_new_tokens``).
        max_tokens: Prompt + all turns at most (``lm.max_episode_tokens``, capped by the
            model's positions).
        step_timeout_s: Longest environment step (``env.step_timeout_s``).
    """

    max_turns: int
    max_new_tokens: int
    max_tokens: int
    step_timeout_s: float


@dataclass
class _Episode:
    env: gym.Env
    group: int
    prompt_ids: list[int]
    prompt_text: str
    ids: list[int] = field(default_factory=list)
    train: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    step_rewards: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)  # the model turn going on (parked)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    success: bool = False
    failure: str | None = None
    done: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def context(self) -> list[int]:
        return self.prompt_ids + self.ids

    def cap(self, limits: TurnLimits) -> int:
        """New tokens this episode's next call may sample: what is left of its turn's
        ``max_new_tokens`` and of its token budget."""
        return min(
            limits.max_new_tokens - len(self.turn_ids), limits.max_tokens - len(self.context())
        )

    def end(self, truncated: bool, failure: str | None = None) -> None:
        self.done, self.truncated, self.failure = True, truncated, failure
        if failure is not None:  # a failed episode earns nothing
            self.step_rewards = [0.0] * len(self.step_rewards)


def run_episodes(
    generate: Generate,
    tokenizer: Any,
    make_env: Callable[[], gym.Env],
    seeds: Sequence[int],
    samples_per_seed: int,
    limits: TurnLimits,
    policy_version: int = 0,
    release_env: Callable[[gym.Env], None] | None = None,
) -> GenerationBatch:
    """Play ``samples_per_seed`` episodes from each reset seed; one row per episode,
    seed-major (the rows of one seed are contiguous and share a group id).

    ``release_env`` takes back the env of every episode that did not fail (for reuse:
    ``reset`` starts its next episode); without it, and for failed episodes, the env is
    closed. Observations are tokenised in one call per turn.

    Raises:
        TextEnvError: ``reset`` returned a non-text observation.
        ValueError: A reset observation already fills the token budget.
    """
    resets = []
    for group, seed in enumerate(seeds):
        for _ in range(samples_per_seed):
            env = make_env()
            obs, info = env.reset(seed=int(seed))
            resets.append((group, int(seed), env, check_text_env(obs, "env.reset"), info))
    episodes: list[_Episode] = []
    prompt_ids = _token_ids(tokenizer, [r[3] for r in resets])
    for (group, seed, env, obs, info), ids in zip(resets, prompt_ids):
        if len(ids) >= limits.max_tokens:
            raise ValueError(
                f"the reset observation of seed {seed} has {len(ids)} tokens, no room "
                f"left in the episode's budget of {limits.max_tokens}"
            )
        meta = {"seed": seed, **{k: v for k, v in info.items() if _plain(v)}}
        episodes.append(_Episode(env, group, list(ids), obs, metadata=meta))
    env_s = 0.0
    while active := [e for e in episodes if not e.done]:
        contexts = [
            Prompt("", e.context(), metadata={"episode": i})
            for i, e in enumerate(episodes)
            if not e.done
        ]
        caps = [e.cap(limits) for e in active]
        texts = _record_turn(active, generate(contexts, caps), caps, tokenizer)
        stepped = [(e, text) for e, text in zip(active, texts) if text is not None]
        if not stepped:  # every turn of the call was parked
            continue
        start = time.perf_counter()
        outcomes = step_with_timeout(
            [e.env for e, _ in stepped], [t for _, t in stepped], limits.step_timeout_s
        )
        env_s += time.perf_counter() - start
        going = [(e, out) for (e, _), out in zip(stepped, outcomes) if _settle(e, out, limits)]
        reply_ids = _token_ids(tokenizer, [out.result[0] for _, out in going])  # one call
        for (e, out), ids in zip(going, reply_ids):
            _append_reply(e, out.result[0], ids, limits)
    for e in episodes:  # a timed-out step may still run in its env: never reuse that one
        (release_env if release_env is not None and e.failure is None else _close)(e.env)
    return _to_batch(episodes, samples_per_seed, tokenizer, policy_version, env_s)


def _record_turn(
    active: list[_Episode], batch: GenerationBatch, caps: list[int], tokenizer: Any
) -> list[str | None]:
    """Append each active episode's sampled tokens (ids and log-probs as sampled, cut to
    the row's cap); the text of every turn that ended (the env's action), None where the
    turn was parked."""
    lengths = batch.response_mask.sum(axis=1).tolist()
    all_ids, all_logprobs = batch.response_ids.tolist(), batch.logprobs.tolist()
    parked = batch.unfinished if batch.unfinished is not None else [False] * len(active)
    texts: list[str | None] = []
    for row, e in enumerate(active):
        keep = min(lengths[row], caps[row])
        ids = all_ids[row][:keep]
        e.ids += ids
        e.train += [True] * keep
        e.logprobs += all_logprobs[row][:keep]
        e.step_rewards += [0.0] * keep
        e.turn_ids += ids
        if parked[row] and keep < caps[row]:
            texts.append(None)
            continue
        # A turn sampled in one call and not cut is the call's completion; else decode it.
        whole = len(e.turn_ids) == keep == lengths[row]
        text = (
            batch.completions[row]
            if whole
            else tokenizer.decode(e.turn_ids, skip_special_tokens=True)
        )
        e.turn_ids = []
        texts.append(text)
        e.texts.append(text)
        e.turns += 1
    return texts


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, each distinct text tokenised once (a GRPO group's episodes
    reset to one task, and their steps often get one reply), in one call."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:  # a tokenizer refuses an empty batch
        return []
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"]))
    return [list(ids[t]) for t in texts]


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


def _close(env: gym.Env) -> None:
    env.close()


def _settle(e: _Episode, out: Any, limits: TurnLimits) -> bool:
    """Record one stepped turn (its reward, tool calls, success); end the episode where
    the step failed, the env ended it or it used its turns.

    Returns:
        Whether the episode goes on (its env's reply is to be appended).
    """
    if out.result is None:
        e.end(truncated=True, failure=out.error)
        return False
    _, reward, terminated, truncated, info = out.result
    if e.step_rewards:
        e.step_rewards[-1] += reward  # the turn's reward sits on its last token
    e.tool_calls += int(info.get("tool_calls", 0))
    e.tool_errors += int("tool_error" in info)
    e.success = bool(info.get("is_success", e.success))
    if terminated or truncated:
        e.end(truncated=bool(truncated and not terminated))
        return False
    if e.turns >= limits.max_turns:
        e.end(truncated=True)
        return False
    return True


def _append_reply(e: _Episode, obs: str, reply: list[int], limits: TurnLimits) -> None:
    """Append the env's reply (``reply``: its token ids) for the next turn to read, or end
    the episode where no room is left for another turn."""
    if len(e.context()) + len(reply) >= limits.max_tokens:
        e.end(truncated=True)
        return
    e.ids += reply
    e.train += [False] * len(reply)
    e.logprobs += [0.0] * len(reply)
    e.step_rewards += [0.0] * len(reply)
    e.texts.append(obs)


def _to_batch(
    episodes: list[_Episode], n: int, tokenizer: Any, version: int, env_s: float
) -> GenerationBatch:
    pad = int(tokenizer.pad_token_id)
    prompt_ids, prompt_mask = pad_sequences([e.prompt_ids for e in episodes], pad, "left")
    response_ids, response_mask = pad_sequences([e.ids for e in episodes], pad, "right")
    width = response_ids.shape[1]

    def right(rows: list[list[Any]], dtype: Any) -> np.ndarray:
        out = np.zeros((len(rows), width), dtype=dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    step_rewards = right([e.step_rewards for e in episodes], np.float32)
    stats = AgentStats(
        returns=step_rewards.sum(axis=1),
        turns=np.array([e.turns for e in episodes], dtype=np.int64),
        tool_calls=np.array([e.tool_calls for e in episodes], dtype=np.int64),
        tool_errors=np.array([e.tool_errors for e in episodes], dtype=np.int64),
        truncated=np.array([e.truncated for e in episodes], dtype=bool),
        success=np.array([e.success for e in episodes], dtype=bool),
        failed=np.array([e.failure is not None for e in episodes], dtype=bool),
        env_s=env_s,
        reasons=[e.failure for e in episodes if e.failure][:8],
    )
    return GenerationBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=right([e.logprobs for e in episodes], np.float32),
        rewards=stats.returns.astype(np.float32),
        group_ids=np.array([e.group for e in episodes], dtype=np.int64),
        prompts=[e.prompt_text for e in episodes],
        completions=["".join(e.texts) for e in episodes],
        metadata=[e.metadata for e in episodes],
        policy_version=version,
        group_size=n,
        pad_token_id=pad,
        loss_mask=right([e.train for e in episodes], bool),
        step_rewards=step_rewards,
        agent=stats,
    )


def episode_token_budget(lm: LMConfig, max_positions: int | None) -> int:
    """Tokens one multi-turn episode may hold: ``lm.max_episode_tokens``, at most the
    model's positions (without either: prompt + ``max_turns`` x 2 x ``max_new_tokens``,
    room for the replies)."""
    budget = lm.max_episode_tokens or lm.max_prompt_tokens + 2 * lm.max_turns * lm.max_new_tokens
    return min(budget, max_positions) if max_positions else budget


def play(actor: Any, prompts: Sequence[Prompt], greedy: bool = False) -> GenerationBatch:
    """A :class:`~rlft_ray.rollout.generation.GenerationActor`'s episodes in its text
    environment: ``lm.num_samples`` from each prompt's reset seed (greedy: one), with the
    actor's ``generate_turn`` (one batched call per turn, any backend; transformers keeps
    the KV cache from one turn to the next) and its policy version.
    ``generate_s`` is the generation time (the env steps' are ``agent.env_s``)."""
    from rlft_ray.agents import make_text_env

    env_cfg, lm = actor.text_env, actor.lm
    if env_cfg is None:
        raise ValueError("this generation actor has no text environment (env section)")
    limits = TurnLimits(
        max_turns=lm.max_turns,
        max_new_tokens=lm.max_new_tokens,
        max_tokens=episode_token_budget(lm, actor.max_positions),
        step_timeout_s=env_cfg.step_timeout_s,
    )
    start = time.perf_counter()
    # The KV cache from one turn to the next (the threshold read now: benchmarks vary it)
    session = TurnSession(park_below=turn_cache.PARK_BELOW)
    pool: list[gym.Env] = actor.idle_text_envs  # made once, reset for each episode
    batch = run_episodes(
        lambda contexts, max_new: actor.generate_turn(contexts, session, greedy, max_new),
        actor.tokenizer,
        lambda: pool.pop() if pool else make_text_env(env_cfg.id, env_cfg.kwargs),
        [int(p.metadata["seed"]) for p in prompts],
        1 if greedy else lm.num_samples,
        limits,
        actor.policy_version,
        release_env=pool.append,
    )
    batch.generate_s = time.perf_counter() - start - batch.agent.env_s
    return batch
