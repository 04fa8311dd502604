"""Schema of preference learning: offline DPO, online DPO and Bradley-Terry reward models.

The pair data itself (``lm.pairs``, ``lm.eval_pairs``, lengths, overflow) lives in the
``lm`` section, shared by every learner that reads pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlft_ray.config.errors import require
from rlft_ray.config.optim import OfflinePasses, OptimConfig

PreferenceLoss = Literal["sigmoid", "ipo", "hinge"]
RewardRegularizer = Literal["none", "sft", "grm"]
ScoreAt = Literal["eos", "last_content_token"]


def check_preference_loss(loss: str, beta: float, label_smoothing: float, sft_coef: float) -> None:
    """Range checks of the loss fields shared by ``dpo`` and ``online_dpo``."""
    require(beta > 0, "beta", f"must be > 0 (got {beta})")
    require(0 <= label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
    require(
        label_smoothing == 0 or loss == "sigmoid",
        "label_smoothing",
        f"is cDPO's, for loss=sigmoid (loss is {loss!r})",
    )
    require(sft_coef >= 0, "sft_coef", "must be >= 0")


@dataclass(frozen=True)
class DPOConfig(OfflinePasses):
    """Direct preference optimisation from a fixed set of pairs (``lm.pairs``).

    Defaults follow Rafailov et al. 2023 and TRL's ``DPOTrainer`` (beta 0.1, sigmoid loss),
    with a learning rate for tiny models. Each iteration is one optimizer step on
    ``batch_size`` pairs (over all learner ranks), micro-batched with gradient
    accumulation; the run takes ``num_epochs`` passes over the pairs.

    Attributes:
        loss: ``sigmoid`` (DPO; cDPO with ``label_smoothing``), ``ipo`` or ``hinge``.
        beta: Strength of the KL constraint to the reference.
        label_smoothing: cDPO's eps, the assumed rate of flipped labels, in [0, 0.5).
        sft_coef: Weight of an NLL (SFT) term on the chosen completions (RPO's alpha).
        num_epochs: Passes over the pairs (sets the run's iterations).
        batch_size: Pairs per optimizer step, over all ranks.
        micro_batch_size: Pairs per forward/backward (chosen and rejected in one forward).
        precompute_ref: Compute the reference log-probs once before training (a Ray Data
            pass over actors, cached next to the pair file and reused while model and
            data are unchanged), so the learner holds one model; false computes them on
            the fly with a frozen reference copy. Computed in the learner's precision
            (bf16 autocast with ``resources.use_gpu``, else fp32).
        shuffle: Reshuffle the pairs every epoch.
        optim: AdamW and its schedule (:class:`~rlft_ray.config.optim.OptimConfig`).
    """

    loss: PreferenceLoss = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_coef: float = 0.0
    precompute_ref: bool = True
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, lr_schedule="linear", warmup_fraction=0.1)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_preference_loss(self.loss, self.beta, self.label_smoothing, self.sft_coef)


@dataclass(frozen=True)
class OnlineDPOConfig:
    """Online / iterative DPO (Guo et al. 2024; Xiong et al. 2024): the generation actors
    sample ``lm.num_samples`` completions per prompt, the reward (function or model)
    ranks them, the best and the worst of each prompt form a pair (prompts whose samples
    all score the same are skipped and counted), and the learner takes DPO steps on the
    round's pairs before publishing the weights.

    Attributes:
        loss, beta, label_smoothing, sft_coef: As in :class:`DPOConfig`.
        ref_refresh_every: Make the current policy the reference every this many rounds
            (null: the starting policy stays the reference).
        num_epochs: Passes over each round's pairs. num_minibatches: Optimizer steps per
            pass. micro_batch_size: Pairs per forward/backward.
        optim: AdamW and its schedule (:class:`~rlft_ray.config.optim.OptimConfig`).
    """

    loss: PreferenceLoss = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_coef: float = 0.0
    ref_refresh_every: int | None = None
    num_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))

    def __post_init__(self) -> None:
        check_preference_loss(self.loss, self.beta, self.label_smoothing, self.sft_coef)
        require(
            self.ref_refresh_every is None or self.ref_refresh_every >= 1,
            "ref_refresh_every",
            "must be >= 1 or null",
        )
        require(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        require(self.num_minibatches >= 1, "num_minibatches", "must be >= 1")
        require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")


@dataclass(frozen=True)
class RewardModelConfig(OfflinePasses):
    """A Bradley-Terry reward model trained on ``lm.pairs`` (Ouyang et al. 2022).

    The model is ``lm.model`` with a scalar head (``AutoModelForSequenceClassification``,
    one label) reading the hidden state at one token of prompt + completion + EOS
    (``score_at``); the loss is the
    Bradley-Terry L_BT = -log sigma(r_chosen - r_rejected - margin) with an optional
    regulariser of the scorer's hidden states, read through the model's LM head on the
    chosen completion (``regularizer``): ``sft``, L_BT + ``sft_coef`` * mean token NLL;
    ``grm``, GRM's (1 - alpha) L_BT + alpha (-log sigma(beta sum_t log pi)) (Yang et al.
    2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model for
    LLMs"). Each iteration is one optimizer step on
    ``batch_size`` pairs over all ranks; ``eval_every`` measures the pairwise accuracy on
    ``lm.eval_pairs`` (``eval/pairwise_accuracy``).

    Attributes:
        margin: m in the loss (0: plain Bradley-Terry).
        score_at: Where the score is read: ``eos`` (the EOS ending the completion) or
            ``last_content_token`` (the token before it). null (default): what Hugging
            Face's classifier pools, the rightmost token that is not padding: ``eos``,
            but ``last_content_token`` when the pad token is the EOS (``ensure_pad_token``'s
            choice for tokenizers without one). Saved in the model's ``config.json``, so
            the scorer (``lm.reward_model``) reads the same position.
        regularizer: ``none`` (plain Bradley-Terry), ``sft`` (the SFT term: ``sft_coef``
            times the chosen completions' mean token NLL, added to L_BT) or ``grm`` (the
            GRM paper's SFT regulariser, ``grm_alpha`` and ``grm_beta``). Both read the
            scorer's last hidden states through the LM head and keep the backbone a
            language model, so the score generalises to completions the pairs did not
            show. null (default): ``sft`` when ``sft_coef > 0``, else ``none``.
        sft_coef: Weight of the ``sft`` term (an SFT/NLL regulariser in the spirit of GRM,
            not the paper's formulation); 0 with any other regulariser.
        grm_alpha: alpha of ``grm``, in (0, 1): L = (1 - alpha) L_BT + alpha L_reg.
        grm_beta: beta of ``grm`` (> 0): L_reg = -log sigma(beta * summed log pi(chosen)).
        num_epochs: Passes over the pairs (sets the run's iterations).
        batch_size: Pairs per optimizer step, over all ranks.
        micro_batch_size: Pairs per forward/backward.
        shuffle: Reshuffle the pairs every epoch.
        optim: AdamW and its schedule (:class:`~rlft_ray.config.optim.OptimConfig`).
    """

    margin: float = 0.0
    score_at: ScoreAt | None = None
    regularizer: RewardRegularizer | None = None
    sft_coef: float = 0.0
    grm_alpha: float = 0.01
    grm_beta: float = 0.1
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, lr_schedule="linear", warmup_fraction=0.05)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.margin >= 0, "margin", "must be >= 0")
        require(self.sft_coef >= 0, "sft_coef", "must be >= 0")
        require(
            self.regularizer != "sft" or self.sft_coef > 0,
            "sft_coef",
            "must be > 0 with regularizer=sft (it is the SFT term's weight)",
        )
        require(
            self.regularizer not in ("none", "grm") or self.sft_coef == 0,
            "sft_coef",
            f"is the sft regularizer's weight; set it to 0 with regularizer={self.regularizer}",
        )
        require(0 < self.grm_alpha < 1, "grm_alpha", "must be in (0, 1)")
        require(self.grm_beta > 0, "grm_beta", "must be > 0")

    @property
    def regularizer_used(self) -> str:
        """The regulariser in effect: ``regularizer``, or from ``sft_coef`` when it is null."""
        if self.regularizer is not None:
            return self.regularizer
        return "sft" if self.sft_coef > 0 else "none"


@dataclass(frozen=True)
class SimPOConfig(OfflinePasses):
    """SimPO (Meng et al. 2024): reference-free, length-normalised preference optimisation
    from ``lm.pairs``, no reference model (nothing is precomputed or kept).

    l = -log sigma(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma). Defaults
    follow TRL's ``CPOConfig(loss_type="simpo")`` (beta 2.0, gamma 0.5). Steps as in
    :class:`DPOConfig`.

    Attributes:
        beta: Reward scale (> 0). gamma: Target margin (>= 0; TRL's ``simpo_gamma``).
        label_smoothing: Conservative (cDPO-style) smoothing eps in [0, 0.5).
        sft_coef: Weight of an NLL term on the chosen completions (CPO-SimPO's alpha).
        num_epochs, batch_size, micro_batch_size, shuffle, optim: from :class:`~rlft_ray.config.optim.OfflinePasses`.
    """

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0
    sft_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        require(self.gamma >= 0, "gamma", f"must be >= 0 (got {self.gamma})")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        require(self.sft_coef >= 0, "sft_coef", "must be >= 0")


@dataclass(frozen=True)
class ORPOConfig(OfflinePasses):
    """ORPO (Hong et al. 2024): SFT on the chosen completions plus an odds-ratio term,
    from ``lm.pairs``, no reference model.

    l = NLL(y_w) + lambda_or * (-log sigma(log odds(y_w) - log odds(y_l))), odds from the
    length-normalised log-probs. Defaults follow TRL's ``ORPOConfig`` (lambda 0.1).

    Attributes:
        lambda_or: lambda, the odds-ratio term's weight (TRL's ``beta``), >= 0.
        num_epochs, batch_size, micro_batch_size, shuffle, optim: from :class:`~rlft_ray.config.optim.OfflinePasses`.
    """

    lambda_or: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lambda_or >= 0, "lambda_or", f"must be >= 0 (got {self.lambda_or})")


@dataclass(frozen=True)
class KTOConfig(OfflinePasses):
    """KTO (Ethayarajh et al. 2024) from unpaired completions labelled desirable or not.

    ``data`` is a ``.jsonl`` / ``.json`` / ``.parquet`` file with TRL's unpaired fields
    ``prompt``, ``completion`` (strings or message lists) and ``label`` (bool), checked
    up front like a pair file (``lm.drop_invalid_pairs``, ``lm.pair_overflow`` and the
    length limits apply). The loss is TRL's ``loss_type="kto"``: desirable completions
    weigh ``desirable_weight`` (1 - sigma(beta (r - z0))), undesirable ones
    ``undesirable_weight`` (1 - sigma(beta (z0 - r))), r = log pi - log pi_ref, with the
    reference point z0 the KL estimated from the batch's mismatched (prompt, completion)
    pairs (completions rotated by one over the batch, as TRL does), over all ranks, before
    each step. The reference is a frozen copy of the starting model (LoRA: adapters off).

    Attributes:
        data: The unpaired file (required).
        beta: beta > 0. desirable_weight / undesirable_weight: lambda_D / lambda_U > 0.
        sft_coef: Weight of an NLL term (mean token NLL) on the desirable completions, as
            ``dpo.sft_coef`` (RPO) on chosen ones; 0: the paper's loss alone.
        num_epochs: Passes over the examples. batch_size: Examples per optimizer step,
            over all ranks (each rank's share >= 2, to mismatch). micro_batch_size:
            Examples per forward/backward. shuffle, optim: As in :class:`DPOConfig`.
    """

    data: str | None = None
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    sft_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.data is None or bool(self.data.strip()), "data", "must not be empty")
        require(self.sft_coef >= 0, "sft_coef", "must be >= 0")
        require(self.beta > 0, "beta", f"must be > 0 (got {self.beta})")
        require(self.desirable_weight > 0, "desirable_weight", "must be > 0")
        require(self.undesirable_weight > 0, "undesirable_weight", "must be > 0")
        require(self.batch_size >= 2, "batch_size", "must be >= 2 (z0 mismatches completions)")
