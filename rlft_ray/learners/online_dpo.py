"""Online (iterative) DPO: pairs ranked from the generation actors' own samples.

Each round the actors sample ``lm.num_samples`` completions for each prompt and score
them with the run's reward (``lm.reward_fn``, or ``lm.reward_model`` through the scorer
actors); the best and the worst completion of each prompt form a pair (prompts whose
samples all score the same carry no preference: skipped and counted), and the learner
takes DPO steps on the round's pairs against the reference (the starting policy, or
the policy every ``online_dpo.ref_refresh_every`` rounds: after exactly k, 2k, ... of
this learner's updates, counted here and kept in the checkpoint, not read from the batch's
policy version, which lags by a round with asynchronous sampling) before publishing the weights
(Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al.
2024, "Iterative Preference Learning from Human Feedback").
"""

from __future__ import annotations

import numpy as np
import torch

from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import global_sum
from rlft_ray.learners.dpo import preference_loss, reference_logps
from rlft_ray.learners.engine import Steps
from rlft_ray.learners.lm_learner import LMLearnerHooks
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.pairwise import pair_update
from rlft_ray.lm.pairs import pair_tensors
from rlft_ray.types import GenerationBatch, PairBatch


def best_worst_pairs(batch: GenerationBatch) -> PairBatch:
    """The best (chosen) and the worst (rejected) completion of every prompt whose samples
    do not all score alike; ties go to the earliest sample. Shapes as in the batch."""
    rewards = batch.rewards.reshape(-1, batch.group_size)
    rows = np.arange(len(batch)).reshape(-1, batch.group_size)
    keep = rewards.max(1) > rewards.min(1)
    best = rows[keep, rewards[keep].argmax(1)]
    worst = rows[keep, rewards[keep].argmin(1)]
    return PairBatch(
        prompt_ids=batch.prompt_ids[best],
        prompt_mask=batch.prompt_mask[best],
        chosen_ids=batch.response_ids[best],
        chosen_mask=batch.response_mask[best],
        rejected_ids=batch.response_ids[worst],
        rejected_mask=batch.response_mask[worst],
        pad_token_id=batch.pad_token_id,
        policy_version=batch.policy_version,
        skipped_groups=int((~keep).sum()),
    )


class OnlineDPOLearner(LMLearnerHooks, Learner):
    """DPO on pairs ranked from each round's samples; DDP across ranks."""

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        if cfg.lm.num_samples < 2:
            raise ConfigError("lm.num_samples", "online DPO pairs two samples of a prompt: >= 2")
        return super().probe(cfg)

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.online_dpo
        self.core = LMRank(cfg, ctx, self.hp, keep_start=True, temperature=1.0)
        # a refreshed reference is part of the run's state: --resume must restore it
        self.core.save_reference = self.hp.ref_refresh_every is not None
        self.optimizer = self.core.optimizer
        self.rounds_done = 0  # updates taken, for ref_refresh_every (rank state: --resume)

    def rank_state(self) -> dict[str, np.ndarray]:
        return {**super().rank_state(), "rounds_done": np.array(self.rounds_done)}

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_rank_state(state)
        if "rounds_done" in state:
            self.rounds_done = int(state["rounds_done"])

    def update(self, batch: GenerationBatch, progress: float) -> dict[str, float]:
        hp, core = self.hp, self.core
        done = self.rounds_done  # rounds finished before this one (continues on --resume)
        refresh = bool(hp.ref_refresh_every and done and done % hp.ref_refresh_every == 0)
        if refresh:
            core.reset_reference()  # the policy so far becomes the reference
        self.rounds_done += 1
        lr = core.engine.set_lr(progress)
        pairs = best_worst_pairs(batch)
        r = torch.as_tensor(batch.rewards, dtype=torch.float64)
        local = torch.tensor(
            [len(pairs), pairs.skipped_groups, len(r) // batch.group_size, r.sum(), len(r)],
            dtype=torch.float64,
            device=self.ctx.device,
        )
        n_pairs, skipped, groups, r_sum, n = global_sum(local, self.ctx).tolist()
        metrics = {
            "rollout/pairs": n_pairs,
            "rollout/flat_group_frac": skipped / max(groups, 1.0),
            "reward/mean": r_sum / max(n, 1.0),
            "optim/lr": lr,
            "optim/ref_refreshed": float(refresh),
        }
        if n_pairs == 0:  # every prompt's samples scored alike on every rank: nothing to rank
            return metrics
        t = pair_tensors(pairs, self.ctx.device)
        t.update(reference_logps(core.reference, t, hp.micro_batch_size))

        def loss(sub: dict[str, torch.Tensor], weight: torch.Tensor):
            return preference_loss(
                core.net, sub, weight, hp.loss, hp.beta, hp.label_smoothing, hp.sft_coef
            )

        steps = Steps(hp.num_epochs, hp.num_minibatches, hp.micro_batch_size, unit="pairs")
        pad_id = batch.pad_token_id
        metrics.update(
            pair_update(core.engine, t, loss, pad_id=pad_id, steps=steps, progress=progress)
        )
        return metrics
