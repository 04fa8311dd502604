"""KTO from unpaired desirable / undesirable completions (``algo: kto``, ``kto.data``).

Each iteration is one optimizer step on ``kto.batch_size`` examples (each rank reads its
share from its Ray Data shard). Before the step a no-gradient pass scores, under the
policy and the frozen reference, each example's completion and its mismatched pair
(the completions rotated by one over the rank's batch, TRL's construction); the
reference point z0 = max(0, mean(log pi - log pi_ref)) of the mismatched pairs is
averaged over every rank's pairs. The step then differentiates
:func:`~rlft_ray.algorithms.kto.kto_losses` through the policy's log-probs of the
completions alone. Metrics use TRL's names: ``kl`` (z0), ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and
``loss/kto``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from rlft_ray.algorithms import kto_losses, sequence_logps
from rlft_ray.config import ConfigError, RunConfig
from rlft_ray.learners.base import CurvePlot, Learner, LearnerContext, Spaces, TaskProbe
from rlft_ray.learners.ddp import global_sum
from rlft_ray.learners.engine import MicroOut, Steps
from rlft_ray.learners.lm_learner import LMLearnerHooks, check_reward_fns
from rlft_ray.learners.lm_rank import LMRank
from rlft_ray.learners.pairwise import LABELLED, probe_labelled
from rlft_ray.lm.labelled import LabelledRows, labelled_tensors
from rlft_ray.lm.pairs import padding_pair, rows_of
from rlft_ray.lm.policy import pair_logps, response_forward
from rlft_ray.lm.prompts import ShardStream


def completion_logps(net: torch.nn.Module, sub: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[b]`` summed log pi of each row's completion (``chosen_*``) under ``net``."""
    out = response_forward(
        net,
        sub["prompt_ids"],
        sub["prompt_mask"],
        sub["chosen_ids"],
        sub["chosen_mask"],
        entropy=False,
    )
    return sequence_logps(out.logprobs, sub["chosen_mask"])


class KTOLearner(LMLearnerHooks, Learner):
    """KTO on one rank's examples; DDP across ranks."""

    scores_samples: ClassVar[bool] = False
    score_metric: ClassVar[str] = "rewards/margins"
    curve: ClassVar[CurvePlot] = CurvePlot("loss/kto", "counters/iteration", "loss_curve.png")

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        super().__init__(cfg, spaces, ctx)
        self.hp = cfg.kto
        self.core = LMRank(cfg, ctx, self.hp, keep_start=True, temperature=1.0)
        self.optimizer = self.core.optimizer
        self.rows = ShardStream(
            ctx.datasets.get(LABELLED),
            self.hp.batch_size // ctx.world_size,
            cfg.seed,
            self.hp.shuffle,
        )

    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        check_reward_fns(cfg)  # lm.eval_fn scores the held-out evaluation
        if cfg.kto.batch_size // cfg.resources.num_learners < 2:
            raise ConfigError(
                "kto.batch_size", "each learner needs >= 2 examples per batch to mismatch them"
            )
        return probe_labelled(cfg, "label")

    def rank_state(self) -> dict[str, np.ndarray]:
        return self.rows.state()

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:
        self.rows.load_state(state)

    def next_batch(self, version: int) -> LabelledRows:
        return LabelledRows(self.rows.next_rows(), version)

    @torch.no_grad()
    def score_pass(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference log-probs of the completions (``ref_chosen``), and the policy's and the
        reference's of the mismatched pairs (``kl_policy``, ``kl_ref``), no gradient."""
        core, micro = self.core, self.hp.micro_batch_size
        out: dict[str, list[torch.Tensor]] = {
            "ref_chosen": [],
            "kl_ref": [],
            "kl_policy": [],
            "policy": [],
        }
        rows = torch.arange(t["prompt_ids"].shape[0], device=self.ctx.device)
        for idx in torch.split(rows, micro) if len(rows) else ():
            sub = rows_of(t, idx)
            ref_c, ref_kl, _ = pair_logps(core.reference, sub)
            pol_c, pol_kl, _ = pair_logps(core.policy, sub)
            for key, val in zip(out, (ref_c, ref_kl, pol_kl, pol_c)):
                out[key].append(val)
        empty = torch.zeros(0, device=self.ctx.device)
        return {k: torch.cat(v) if v else empty for k, v in out.items()}

    def update(self, batch: LabelledRows, progress: float) -> dict[str, float]:
        hp, core, dev = self.hp, self.core, self.ctx.device
        pad_id = int(core.tokenizer.pad_token_id)
        t = labelled_tensors(batch.rows, pad_id, dev, mismatch=True)
        scores = self.score_pass(t)
        t["ref_chosen"] = scores["ref_chosen"]
        label = t["value"] > 0.5
        rewards = hp.beta * (scores["policy"] - scores["ref_chosen"])
        sums = global_sum(
            torch.stack(
                [
                    (scores["kl_policy"] - scores["kl_ref"]).sum(),
                    torch.tensor(float(len(label)), device=dev),
                    (rewards * label).sum(),
                    label.float().sum(),
                    (rewards * ~label).sum(),
                    (scores["policy"] * label).sum(),
                    (scores["policy"] * ~label).sum(),
                ]
            ).double(),
            self.ctx,
        ).tolist()
        kl_sum, n, rew_d, n_d, rew_u, logp_d, logp_u = sums
        z0 = max(kl_sum / max(n, 1.0), 0.0)  # TRL: the batch mean over ranks, clamped at 0

        def micro_loss(idx: torch.Tensor | None) -> MicroOut:
            if idx is None:
                sub = padding_pair(t, pad_id)
                sub["value"] = torch.zeros(1, device=dev)
                weight = torch.zeros(1, device=dev)
            else:
                sub, weight = rows_of(t, idx), torch.ones(len(idx), device=dev)
            logps = completion_logps(core.net, sub)
            losses, _ = kto_losses(
                logps,
                sub["ref_chosen"],
                sub["value"] > 0.5,
                z0,
                hp.beta,
                hp.desirable_weight,
                hp.undesirable_weight,
            )
            total = (losses * weight).sum()
            stats = {"loss/kto": float((losses.detach() * weight).sum())}
            if hp.sft_coef:  # mean token NLL of the desirable completions (RPO-style)
                nll = -logps / sub["chosen_mask"].sum(-1).clamp_min(1) * (sub["value"] > 0.5)
                total = total + hp.sft_coef * (nll * weight).sum()
                stats["loss/sft"] = float((nll.detach() * weight).sum())
            return MicroOut(total, float(weight.sum()), stats)

        def denominator(rows: torch.Tensor) -> torch.Tensor:
            return torch.tensor(float(len(rows)), device=dev)

        steps = Steps(micro_batch_size=hp.micro_batch_size, unit="examples")
        metrics = core.engine.run(
            t["prompt_ids"].shape[0], micro_loss, denominator, steps, progress
        )
        n_u = n - n_d
        metrics["kl"] = z0
        metrics["data/desirable_frac"] = n_d / max(n, 1.0)
        if n_d:
            metrics["rewards/chosen"] = rew_d / n_d
            metrics["logps/chosen"] = logp_d / n_d
        if n_u:
            metrics["rewards/rejected"] = rew_u / n_u
            metrics["logps/rejected"] = logp_u / n_u
        if n_d and n_u:
            metrics["rewards/margins"] = rew_d / n_d - rew_u / n_u
        return metrics
