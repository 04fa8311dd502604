"""Schema of rejection-sampling fine-tuning (``rsft``) and ``rlft-ray sample``'s selection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rlft_ray.config.errors import require
from rlft_ray.config.lm import LossAgg, check_steps
from rlft_ray.config.optim import OptimConfig

Selection = Literal["all", "best_of_n", "threshold", "quantile", "acceptance"]


@dataclass(frozen=True)
class RSFTConfig:
    """Rejection-sampling fine-tuning: sample, keep the best, fine-tune on them, repeat.

    Expert iteration / ReST / RAFT (Anthony et al. 2017; Gulcehre et al. 2023; Dong et al.
    2023). One iteration is one *round*: ``lm.prompts_per_iteration`` prompts x
    ``lm.num_samples`` completions are generated, scored and selected on the generation
    actors (only accepted ones reach the learner); the learner takes ``num_epochs``
    passes of cross-entropy over the accepted completions (prompt tokens masked) and
    publishes the new weights. ``rlft-ray sample`` uses the same selection fields.

    Attributes:
        rounds: Rounds of sample -> select -> fine-tune (the run's iteration budget).
        select: ``all``, ``best_of_n`` (top ``top_k`` per prompt), ``threshold``
            (reward >= ``threshold``), ``quantile`` (top ``quantile`` of the batch, or of
            each prompt with ``quantile_per_group``), ``acceptance`` (statistical
            rejection sampling: accept c with probability min(1, p(c) / (M q(c)))).
        top_k: best_of_n: completions kept per prompt.
        threshold: threshold: the reward cut-off tau.
        quantile: quantile: the kept fraction q in (0, 1].
        quantile_per_group: quantile: rank within each prompt's completions.
        beta: acceptance with the reward-tilted target p ∝ q exp(r / beta).
        reward_max: acceptance (tilted): a known upper bound of the reward (exact); null
            uses the running maximum of the rewards seen so far (approximate).
        target_model: acceptance against this model's log-probabilities (path or hub
            id; its tokenizer must equal the policy's) instead of the tilted target.
        log_m: acceptance with ``target_model``: log M; null estimates it from the first
            (warm-up) batch as the largest log p - log q seen.
        min_reward: After the rule, also drop samples with a lower reward (e.g. 1.0 keeps
            only verified-correct completions); null: no floor.
        weighting: ``none``, or ``reward``: each completion's loss weighted by its
            reward over the mean accepted reward (negative rewards count as 0).
        reset_to_base: Fine-tune from the starting weights every round (ReST-EM, Singh
            et al. 2023) instead of continuing from the last round's.
        max_empty_rounds: Stop with an error after this many rounds in a row accept
            nothing (0: never stop; an empty round only skips its update).
        optim: AdamW and its schedule (:class:`~rlft_ray.config.optim.OptimConfig`).
        num_epochs: Passes over each round's accepted completions.
        num_minibatches: Optimizer steps per pass. micro_batch_size: Sequences per
            forward/backward. loss_agg: Token aggregation of the cross-entropy.
    """

    rounds: int = 20
    select: Selection = "best_of_n"
    top_k: int = 1
    threshold: float = 1.0
    quantile: float = 0.25
    quantile_per_group: bool = False
    beta: float = 0.5
    reward_max: float | None = None
    target_model: str | None = None
    log_m: float | None = None
    min_reward: float | None = None
    weighting: Literal["none", "reward"] = "none"
    reset_to_base: bool = False
    max_empty_rounds: int = 3
    num_epochs: int = 2
    num_minibatches: int = 4
    micro_batch_size: int = 32
    loss_agg: LossAgg = "token-mean"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))

    def __post_init__(self) -> None:
        check_steps(self.num_epochs, self.num_minibatches, self.micro_batch_size)
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.top_k >= 1, "top_k", f"must be >= 1 (got {self.top_k})")
        require(0 < self.quantile <= 1, "quantile", f"must be in (0, 1] (got {self.quantile})")
        require(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        require(self.max_empty_rounds >= 0, "max_empty_rounds", "must be >= 0 (0: never stop)")
        require(self.log_m is None or math.isfinite(self.log_m), "log_m", "must be finite or null")
        require(
            self.target_model is None or self.select == "acceptance",
            "target_model",
            f"is only used by rsft.select=acceptance (select is {self.select!r})",
        )
        require(
            self.log_m is None or self.target_model is not None,
            "log_m",
            "is the bound of target-model acceptance: set rsft.target_model too",
        )
        require(
            not self.reset_to_base
            or (self.optim.lr_schedule == "constant" and self.optim.warmup_fraction == 0),
            "optim.lr_schedule",
            "with rsft.reset_to_base every round trains from the base anew: a schedule over "
            "the whole run would leave the last rounds at a learning rate near 0; use "
            "lr_schedule=constant and warmup_fraction=0",
        )
        for name in ("threshold", "min_reward"):
            bar = getattr(self, name)
            used = name == "min_reward" or self.select == "threshold"
            require(
                not used or bar is None or self.reward_max is None or bar <= self.reward_max,
                name,
                f"{bar} is above rsft.reward_max={self.reward_max}: no sample could be accepted",
            )
