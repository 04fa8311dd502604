"""Held-out evaluation on a generation actor (:class:`HeldOutScoring`, a mixin of
:class:`~rlft_ray.rollout.generation.GenerationActor`): greedy accuracy by ``lm.eval_fn``,
pass@k / maj@k from sampled completions, the learned reward beside the truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rlft_ray.algorithms.pass_at_k import answer_ids
from rlft_ray.rewards import compute_rewards, load_reward_fn
from rlft_ray.rollout.multiturn import play
from rlft_ray.types import GenerationBatch, Prompt

if TYPE_CHECKING:
    from rlft_ray.config import LMConfig


class HeldOutScoring:
    """The evaluation half of a generation actor; needs its ``generate``, ``lm``,
    ``text_env``, ``reward_model`` and ``policy_version``."""

    lm: LMConfig

    def heldout_scores(self, prompts: Sequence[Prompt]) -> tuple[int, dict[str, np.ndarray]]:
        """The policy version held and scores of greedy completions (held-out evaluation
        during training): ``accuracy`` by ``lm.eval_fn``, and ``reward_model`` by the learned
        reward when one serves this actor (where the two part ways, the policy games it)."""
        batch, accuracy = self.evaluate(prompts)
        scores = {"accuracy": accuracy}
        if self.lm.eval_samples > 0:  # eval/pass@k, eval/maj@k
            scores["sample_correct"], scores["sample_answers"] = self.sample_scores(
                prompts, self.lm.eval_samples
            )
        if self.reward_model is not None:
            scores["reward_model"] = self.reward_model(
                batch.prompts, batch.completions, batch.prompt_templated
            )
        return self.policy_version, scores

    def sample_scores(
        self, prompts: Sequence[Prompt], num_samples: int, eval_fn: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``correct [P, n]`` (``eval_fn`` score >= 0.5; default ``lm.eval_fn``) and
        :func:`~rlft_ray.algorithms.pass_at_k.answer_ids` ``[P, n]`` of ``num_samples``
        completions per prompt sampled at ``lm.temperature``: what pass@k and maj@k use."""
        batch = self.generate(prompts, num_samples=num_samples)
        fn = load_reward_fn(eval_fn or self.lm.eval_fn)
        scores = compute_rewards(fn, batch.prompts, batch.completions, batch.metadata)
        correct = np.asarray(scores, dtype=np.float32).reshape(-1, num_samples) >= 0.5
        return correct, answer_ids(batch.completions, num_samples)

    def evaluate(
        self, prompts: Sequence[Prompt], eval_fn: str | None = None
    ) -> tuple[GenerationBatch, np.ndarray]:
        """Greedy completions and their ``eval_fn`` (default ``lm.eval_fn``) scores (text
        environment: greedy episodes and whether each solved its task, ``is_success``)."""
        if self.text_env is not None:
            batch = play(self, prompts, greedy=True)
            return batch, batch.agent.success.astype(np.float32)
        batch = self.generate(prompts, greedy=True)
        fn = load_reward_fn(eval_fn or self.lm.eval_fn)
        scores = compute_rewards(fn, batch.prompts, batch.completions, batch.metadata)
        return batch, np.asarray(scores, dtype=np.float32)
