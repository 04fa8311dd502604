"""Scoring completions with a learned (Bradley-Terry) reward model.

:class:`RewardModelScorer` is a plain class (tests use it directly); the driver starts
``resources.num_scorer_actors`` of them as Ray actors when ``lm.reward_model`` is set and
hands their handles to the generation actors, which send each batch of completions to
one of them instead of calling ``lm.reward_fn``. A completion is scored exactly as the
reward model was trained: prompt tokens, then the completion's tokens and EOS. A prompt
is encoded as the pair files' prompts were (:mod:`rlft_ray.lm.pairs`): without special
tokens when it came through the chat template (it wrote them; a conversational prompt
always does), with the tokenizer's special tokens (a BOS) otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlft_ray.core.torch_utils import hold_threads
from rlft_ray.rewards import RewardError
from rlft_ray.types import pad_sequences


def reward_model_dir(path: str | Path) -> Path:
    """The ``save_pretrained`` directory of a reward model: a checkpoint's ``policy/`` or ``path``."""
    p = Path(path).expanduser()
    return p / "policy" if (p / "policy" / "config.json").is_file() else p


class RewardModelScorer:
    """Holds one sequence-classification reward model, or an ensemble of them, and scores
    (prompt, completion) pairs.

    With N models the reward is :func:`~rlft_ray.algorithms.reward_ensemble.ensemble_reward`
    of their scores (mean - ``std_coef`` * std); then, with ``clip``, it is clipped to
    [-clip, clip] (:func:`~rlft_ray.algorithms.reward_ensemble.clip_reward`). Each member
    encodes with its own tokenizer and reads its score where it was trained to.

    Args:
        path: An ``algo: reward_model`` checkpoint or a ``save_pretrained`` directory, or
            a list of them (an ensemble).
        num_threads: torch threads (the CPUs this actor holds).
        device: ``"cpu"`` or ``"cuda"``.
        batch_size: Sequences per forward pass.
        add_special_tokens: Tokenize prompts with the tokenizer's special tokens, as the
            pair files were when their prompts were plain strings (false when every prompt
            is rendered by the chat template, ``lm.chat_template``: it wrote them already).
            A prompt flagged as templated in :meth:`score` never gets them.
        std_coef: k of the ensemble's mean - k * std (``lm.reward_ensemble_std_coef``).
        clip: Bound of the reward (``lm.reward_clip``); None: off.
    """

    def __init__(
        self,
        path: str | Sequence[str],
        num_threads: int = 1,
        device: str = "cpu",
        batch_size: int = 256,
        add_special_tokens: bool = True,
        std_coef: float = 0.0,
        clip: float | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlft_ray.lm import quiet_transformers
        from rlft_ray.lm.loading import fuse_activations

        quiet_transformers()
        hold_threads(num_threads)
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        if not paths:
            raise ValueError("RewardModelScorer needs at least one reward model path")
        self.device = torch.device(device)
        self.members: list[_Member] = []
        for p in paths:
            directory = reward_model_dir(p)
            model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
            fuse_activations(model)
            model.to(self.device)
            cfg = model.config
            if cfg.pad_token_id is None:
                raise ValueError(f"reward model {directory} has no pad_token_id in its config")
            max_positions = getattr(cfg, "max_position_embeddings", None) or getattr(
                cfg, "n_positions", None
            )
            tokenizer = AutoTokenizer.from_pretrained(directory)
            self.members.append(_Member(tokenizer, model, int(cfg.pad_token_id), max_positions))
        # the first member's, for single-model callers (``rlft-ray eval`` of a reward model)
        first = self.members[0]
        self.tokenizer, self.model, self.pad_id = first.tokenizer, first.model, first.pad_id
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.std_coef = std_coef
        self.clip = clip

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        templated: Sequence[bool] | None = None,
    ) -> list[float]:
        """The reward of each completion of its prompt (one model's score, or the
        ensemble's mean - k * std; clipped with ``clip``).

        Args:
            prompts: Prompt texts as the policy saw them.
            completions: Completion texts.
            templated: Per prompt, whether its text came through the chat template
                (:attr:`~rlft_ray.types.Prompt.templated`): encoded without special
                tokens then. None: no prompt was (only ``add_special_tokens`` decides).
        """
        from rlft_ray.algorithms.reward_ensemble import clip_reward, ensemble_reward

        if not prompts:
            return []
        flags = [False] * len(prompts) if templated is None else [bool(t) for t in templated]
        per_member = [self._member_scores(m, prompts, completions, flags) for m in self.members]
        rewards = ensemble_reward(torch.tensor(per_member, dtype=torch.float64), self.std_coef)
        return clip_reward(rewards, self.clip).tolist()

    def _member_scores(
        self,
        member: _Member,
        prompts: Sequence[str],
        completions: Sequence[str],
        flags: Sequence[bool],
    ) -> list[float]:
        """One member's scores: prompt tokens, completion tokens, EOS."""
        tok, eos = member.tokenizer, member.tokenizer.eos_token_id
        seqs = [
            [
                *tok(p, add_special_tokens=self.add_special_tokens and not t)["input_ids"],
                *tok(c, add_special_tokens=False)["input_ids"],
                eos,
            ]
            for p, c, t in zip(prompts, completions, flags)
        ]
        if member.max_positions:  # the end is what is scored: keep the last tokens
            seqs = [s[-member.max_positions :] for s in seqs]
        out: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            out.extend(
                score_sequences(member.model, seqs[start : start + self.batch_size], member.pad_id)
            )
        return out


@dataclass
class _Member:
    """One reward model of a scorer: its tokenizer, model, pad id and context length."""

    tokenizer: Any
    model: Any
    pad_id: int
    max_positions: int | None


def score_sequences(model: Any, seqs: Sequence[Sequence[int]], pad_id: int) -> list[float]:
    """Scores of token sequences under a one-label sequence-classification model.

    Sequences are right-padded; the score is read where the model was trained to read it
    (``reward_model.score_at``: :func:`~rlft_ray.lm.policy.score_reads_at`).
    """
    from rlft_ray.lm.policy import needs_hidden_states, score_reads_at

    if not seqs:
        return []
    device = next(model.parameters()).device
    ids, mask = pad_sequences(seqs, pad_id, "right")
    input_ids = torch.as_tensor(ids, device=device)
    attention_mask = torch.as_tensor(mask, device=device).long()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=needs_hidden_states(model),
    )
    return score_reads_at(model, input_ids, attention_mask, out).cpu().tolist()


class ScorerClient:
    """What a generation actor holds: scorer actors (Ray handles) or plain scorers, used in
    turn, with a bounded wait and a check of every returned score.

    Args:
        scorers: :class:`RewardModelScorer` instances or Ray actor handles of them.
        timeout_s: Longest wait for one batch's scores.
    """

    def __init__(self, scorers: Sequence[Any], timeout_s: float = 300.0, start: int = 0) -> None:
        if not scorers:
            raise ValueError("ScorerClient needs at least one scorer")
        scorers = list(scorers)
        k = start % len(scorers)  # actors start at different scorers, or all would queue at one
        self._next = itertools.cycle(scorers[k:] + scorers[:k])
        self.timeout_s = timeout_s

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        templated: Sequence[bool] | None = None,
    ) -> np.ndarray:
        """``[B]`` float32 rewards (``templated``: see :meth:`RewardModelScorer.score`).

        Raises:
            RewardError: A score is NaN/inf, the count is wrong, or the scorer did not answer.
        """
        scorer = next(self._next)
        # the flags travel only when given: a scorer written for two arguments still serves
        args = (list(prompts), list(completions))
        if templated is not None:
            args = (*args, [bool(t) for t in templated])
        if hasattr(scorer.score, "remote"):
            import ray

            try:
                scores = ray.get(
                    scorer.score.remote(*args),
                    timeout=self.timeout_s,
                )
            except ray.exceptions.GetTimeoutError as exc:
                raise RewardError(
                    f"reward model scorer gave no scores within {self.timeout_s:.0f} s"
                ) from exc
        else:
            scores = scorer.score(*args)
        if len(scores) != len(prompts):
            raise RewardError(
                f"reward model returned {len(scores)} scores for {len(prompts)} samples"
            )
        for i, v in enumerate(scores):
            if not math.isfinite(v):
                raise RewardError(
                    f"reward model returned {v} for sample {i} (prompt {prompts[i]!r}); "
                    "rewards must be finite"
                )
        return np.asarray(scores, dtype=np.float32)
