"""Schema of the GRPO family's section (``grpo``): GRPO, DAPO, Dr. GRPO, GSPO, RLOO,
REINFORCE and REINFORCE++ as fields of one critic-free policy-gradient learner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlft_ray.config.errors import require
from rlft_ray.config.lm import KLEstimator, LossAgg, check_clip_and_kl, check_steps
from rlft_ray.config.optim import OptimConfig


@dataclass(frozen=True)
class GRPOConfig:
    """Critic-free policy gradient with group or batch baselines: GRPO and its variants
    (DAPO, Dr. GRPO, GSPO), RLOO, REINFORCE and REINFORCE++.

    Defaults follow GRPO in DeepSeekMath (Shao et al. 2024): group-normalised
    advantages, one update per batch, clip 0.2, k3 KL to the reference in the loss
    with beta = 0.04, sequence-mean-token-mean loss, lr 1e-6. The variants are these
    fields set as their papers do (``examples/arithmetic_{dapo,dr_grpo,gspo,reinforce_pp}.yaml``;
    ``docs/algorithms.md``): DAPO = ``clip_high: 0.28``, ``dynamic_sampling``,
    ``loss_agg: token-mean``, ``overlong_buffer``, ``kl_coef: 0``; Dr. GRPO =
    ``std_normalize: false``, ``loss_agg: seq-mean-token-sum-norm``; GSPO =
    ``ratio_level: sequence`` with a small clip range; REINFORCE++ = ``estimator:
    reinforce_pp`` (or ``reinforce_pp_baseline``), ``kl_in: reward``, ``kl_estimator: k1``.

    Attributes:
        estimator: ``grpo`` (r - mean) / std per group, ``rloo`` leave-one-out mean
            (Ahmadian et al. 2024), ``reinforce`` batch-mean baseline, ``reinforce_pp``
            REINFORCE++ (Hu 2025): token returns with the KL in the reward, whitened over
            the global batch (OpenRLHF's ``reinforce``), ``reinforce_pp_baseline`` the
            same after subtracting each group's mean reward (OpenRLHF's ``reinforce_baseline``).
        std_normalize: Divide GRPO advantages by the group std (false: Dr. GRPO).
        kl_coef: beta, weight of KL(pi || pi_ref).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020).
        kl_in: Put the KL penalty in the ``loss`` (GRPO) or subtract it from the
            ``reward`` before the advantages (RLOO paper: the summed KL off the sequence
            reward; REINFORCE++: each token's KL off that token's reward).
        clip_low: PPO-clip epsilon (lower); ``clip_high`` the upper one (null: same;
            0.28 with 0.2 is DAPO's "clip-higher").
        ratio_level: ``token``: PPO's per-token ratio; ``sequence``: GSPO's (Zheng et al.
            2025) length-normalised sequence ratio, clipped per sequence (use a small clip
            range, the paper's 3e-4 / 4e-4, and ``loss_agg: seq-mean-token-mean``).
        dynamic_sampling: DAPO's dynamic sampling (Yu et al. 2025): groups whose rewards
            are all equal are dropped and the actors sample more prompts until the batch
            has ``lm.prompts_per_iteration`` informative groups again (``rollout/filtered_groups``,
            ``rollout/extra_samples``). Needs a per-group baseline and ``lm.num_samples >= 2``.
        max_resample_rounds: Extra sampling rounds per iteration at most; still short
            after them, the update takes the informative groups it has (all sampled groups
            when none is informative).
        overlong_buffer: DAPO's soft overlong punishment: the last this many tokens before
            ``lm.max_new_tokens`` ramp a penalty from 0 down to ``-overlong_penalty`` (eq. 13);
            0: off.
        overlong_penalty: The penalty at the length limit.
        tis_cap: Truncated importance sampling for a sampler that computes another
            distribution than the learner (vLLM, bf16 kernels): the learner recomputes the
            sampled tokens' log-probs under the sampling weights, takes the PPO ratio
            against them, and weights each token by min(pi_learner / pi_sampler, tis_cap)
            (2.0 is usual); null: off. ``rollout/logprob_gap`` reports the mismatch
            whenever the learner recomputes (TIS on, or ``lm.backend: vllm``), over the
            rows the update trains (none: no gap that iteration).
        num_epochs: Passes over each batch. num_minibatches: optimizer steps per pass.
        micro_batch_size: Sequences per forward/backward; gradients accumulate over a
            minibatch's micro-batches (and average over DDP ranks) before each step.
        loss_agg: ``token-mean`` (DAPO), ``seq-mean-token-mean`` (GRPO),
            ``seq-mean-token-sum`` or ``seq-mean-token-sum-norm`` (Dr. GRPO: token sums over
            the constant ``lm.max_new_tokens``).
        optim: AdamW and its schedule (:class:`~rlft_ray.config.optim.OptimConfig`).
    """

    estimator: Literal["grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline"] = (
        "grpo"
    )
    std_normalize: bool = True
    kl_coef: float = 0.04
    kl_estimator: KLEstimator = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    clip_low: float = 0.2
    clip_high: float | None = None
    ratio_level: Literal["token", "sequence"] = "token"
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    num_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int = 8
    loss_agg: LossAgg = "seq-mean-token-mean"
    tis_cap: float | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))

    def __post_init__(self) -> None:
        check_steps(self.num_epochs, self.num_minibatches, self.micro_batch_size)
        check_clip_and_kl(self.clip_low, self.clip_high, self.kl_coef, self.tis_cap)
        require(self.max_resample_rounds >= 0, "max_resample_rounds", "must be >= 0")
        require(self.overlong_buffer >= 0, "overlong_buffer", "must be >= 0 (0: off)")
        require(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")
        require(
            not self.dynamic_sampling or self.estimator not in ("reinforce", "reinforce_pp"),
            "dynamic_sampling",
            f"drops groups whose rewards are all equal, which only carry no signal under a "
            f"per-group baseline; estimator {self.estimator!r} has a batch baseline (use grpo, "
            "rloo or reinforce_pp_baseline)",
        )
