"""Rejection-sampling fine-tuning (RSFT): supervised fine-tuning on accepted samples.

Expert iteration / ReST / RAFT (Anthony et al. 2017; Gulcehre et al. 2023; Dong et al.
2023): each round the generation actors sample ``lm.num_samples`` completions per prompt,
score them and keep the ones the ``rsft.select`` rule accepts; only those reach this
learner, which minimises the cross-entropy of the accepted completions given their
prompts (prompt tokens masked)::

    L = - sum_i w_i sum_t m_it log pi(y_it | x_i, y_i<t) / (aggregation of rsft.loss_agg)

with w_i = 1, or r_i / mean(r_accepted) with ``rsft.weighting=reward``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.core.errors import DeterministicError
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import global_sum
from rlft_ray.learners.lm_batches import agent_metrics
from rlft_ray.learners.lm_learner import LMLearnerHooks, lm_sampler_kwargs, probe_lm
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.lm.policy import ResponseOutput
from rlft_ray.types import GenerationBatch


class EmptyRoundsError(DeterministicError, RuntimeError):
    """Too many rounds in a row accepted no sample; the message says which rule and what to try."""


class RSFTLearner(LMLearnerHooks, Learner):
    """Cross-entropy on the accepted completions of each round; DDP across ranks."""

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.rsft
        # cross-entropy of the model itself (T = 1), not of the tempered sampling policy
        self.core = LMRank(cfg, ctx, self.hp, keep_start=self.hp.reset_to_base, temperature=1.0)
        self.optimizer = self.core.optimizer
        self.empty_rounds = 0

    # -- class-level hooks ---------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig, training: bool = True) -> TaskProbe:
        """The LM checks plus the selection's: a target model's tokenizer must be the
        policy's, and its log-ratio needs the recorded log q to be the sampling law.
        ``training=False``: for ``rlft-ray sample`` (no rounds, no per-iteration sizes)."""
        hp = cfg.rsft
        if hp.target_model is not None and cfg.lm.top_p < 1.0:
            raise ConfigError(
                "lm.top_p",
                "target-model acceptance compares log p with the log q a completion was "
                "sampled with; nucleus sampling (top_p < 1) changes q: set lm.top_p=1.0",
            )
        probe = probe_lm(cfg, training)
        run = probe.cfg or cfg
        if hp.target_model is not None:
            target = _check_same_tokenizer(run, hp.target_model)
            run = dataclasses.replace(run, rsft=dataclasses.replace(hp, target_model=target))
        rounds = min(hp.rounds, run.total_iterations or hp.rounds)
        per_round = run.lm.prompts_per_iteration * run.lm.num_samples
        probe.cfg = dataclasses.replace(
            run, total_iterations=rounds, total_env_steps=rounds * per_round
        )
        return probe

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        return {**lm_sampler_kwargs(cfg, index), "selection": cfg.rsft}

    # -- learning --------------------------------------------------------------------------
    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        metrics = selection_metrics(batch, self.ctx)
        metrics.update(agent_metrics(batch, self.ctx))  # multi-turn: turns, tools, truncation
        if metrics["rollout/accepted"] == 0:  # the same decision on every rank (global count)
            self.empty_rounds += 1
            metrics["rollout/empty_rounds"] = float(self.empty_rounds)
            if hp.max_empty_rounds and self.empty_rounds >= hp.max_empty_rounds:
                raise EmptyRoundsError(
                    f"{self.empty_rounds} rounds in a row accepted no sample "
                    f"(rsft.select={hp.select}, rsft.min_reward={hp.min_reward}); loosen the "
                    "selection or check lm.reward_fn (rsft.max_empty_rounds=0 never stops)"
                )
            return metrics  # nothing to learn from: no step, the weights stay
        self.empty_rounds = 0
        metrics["rollout/empty_rounds"] = 0.0
        if hp.reset_to_base:
            core.reset_to_start()
            self.optimizer = core.optimizer
        tensors = core.tensors(batch)
        tensors["weights"] = self.sample_weights(tensors["rewards"])

        def token_loss(
            out: ResponseOutput, sub: dict[str, torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            nll = -out.logprobs
            return nll * sub["weights"].unsqueeze(-1), {"nll": nll.detach()}

        metrics.update(core.optimize(tensors, token_loss, progress))
        return metrics

    def sample_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[B]`` loss weights: 1, or reward over the mean accepted reward (all ranks)."""
        if self.hp.weighting == "none":
            return torch.ones_like(rewards, dtype=torch.float32)
        r = rewards.float().clamp_min(0.0)
        count = torch.tensor(float(len(r)), device=r.device)
        total, count = global_sum(torch.stack([r.sum(), count]), self.ctx)
        mean = float(total) / max(float(count), 1.0)
        return r / mean if mean > 0 else torch.ones_like(r)


def selection_metrics(batch: GenerationBatch, ctx: LearnerContext) -> dict[str, float]:
    """``rollout/*`` and ``reward/*`` numbers of a selected batch, over all ranks' samples.

    ``reward/*`` are over every generated sample (the policy's quality), the
    ``rollout/reward_mean_accepted`` over the kept ones.
    """
    sel = batch.selection
    if sel is None:
        raise ValueError("RSFT needs batches from a selecting generation actor (rsft section)")
    r = sel.rewards.astype("float64")
    kept = r[sel.accepted]
    local = torch.tensor(
        [len(r), len(kept), r.sum(), (r * r).sum(), kept.sum(), sel.clipped], dtype=torch.float64
    )
    n, n_acc, r_sum, r_sq, acc_sum, clipped = global_sum(local.to(ctx.device), ctx).tolist()
    mean = r_sum / max(n, 1.0)
    out = {
        "rollout/generated": n,
        "rollout/accepted": n_acc,
        "rollout/accept_rate": n_acc / max(n, 1.0),
        "rollout/accept_clip_frac": clipped / max(n, 1.0),
        "rollout/reward_mean_all": mean,
        "reward/mean": mean,
        "reward/std": max(r_sq / max(n, 1.0) - mean * mean, 0.0) ** 0.5,
    }
    if n_acc:
        out["rollout/reward_mean_accepted"] = acc_sum / n_acc
    if sel.bound is not None:
        out["rollout/selection_bound"] = float(sel.bound)
    return out


def _check_same_tokenizer(cfg: RunConfig, target: str) -> str:
    """The resolved target model path, if its tokenizer is the policy's.

    Raises:
        ConfigError: ``rsft.target_model`` cannot be loaded or tokenizes differently.
    """
    from transformers import AutoTokenizer

    from rlft_ray.lm.loading import ensure_pad_token, load_tokenizer, resolve_model_path

    path = resolve_model_path(target, "rsft.target_model")
    if os.path.exists(path):  # workers run elsewhere: make a local path absolute
        path = str(Path(path).resolve())
    policy_tok, _ = load_tokenizer(cfg)
    try:
        target_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.lm.trust_remote_code)
    except Exception as exc:
        raise ConfigError(
            "rsft.target_model", f"cannot load a tokenizer from {path!r}: {exc}"
        ) from exc
    ensure_pad_token(target_tok)  # the policy's got the same treatment in load_tokenizer
    theirs, ours = target_tok.get_vocab(), policy_tok.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        raise ConfigError(
            "rsft.target_model",
            f"its tokenizer differs from the policy's ({len(theirs)} vs {len(ours)} tokens, "
            f"{differ} entries differ): log p and log q of one completion cannot be compared",
        )
    return path
