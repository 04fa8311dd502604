"""Schema of value-based LM fine-tuning: ILQL (Snell et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlft_ray.config.errors import require
from rlft_ray.config.optim import OfflinePasses, OptimConfig


@dataclass(frozen=True)
class ILQLConfig(OfflinePasses):
    """Implicit Language Q-Learning from a reward-labelled offline set (Snell et al. 2022).

    ``data`` is any ``prompt`` / ``completion`` / ``reward`` table (``.jsonl``, ``.json``,
    ``.parquet``): e.g. ``accepted.jsonl`` of ``rlft-ray sample`` with ``rsft.select=all``.
    Heads on the LM's last hidden state: twin Q (``[H] -> [V]`` each, two-layer MLPs as in
    trlX), their Polyak-averaged targets and V (``[H] -> 1``). Per token, the loss is
    ``(Q1 - y)^2 + (Q2 - y)^2 + v_coef L_tau(min(Q-hat) - V) + cql_coef CQL + bc_coef NLL``
    with y = r + gamma V(s'), the sequence's reward on its last token; the NLL trains the
    LM as the behaviour policy pi_beta that decoding perturbs (``lm.decode: ilql``:
    log_softmax(logits) + ``lm.decode_beta`` (Q-hat - V)). Defaults follow trlX's
    ``ILQLConfig`` (tau 0.7, gamma 0.99, cql 0.1, bc 1), with a larger Polyak rate for
    short runs. Checkpoints save the heads as ``ilql_heads.safetensors`` (also inside
    ``policy/``, where ``lm.decode: ilql`` finds them).

    Attributes:
        data: The reward-labelled file (required).
        gamma: Discount. tau: V's expectile in (0, 1).
        td_lambda: lambda of Q's target in [0, 1]: 0 is ILQL's one-step TD target
            r + gamma V(s'), 1 the Monte Carlo return, between them the lambda-return.
        v_coef: Weight of V's expectile loss. cql_coef: Weight of the CQL term.
        bc_coef: Weight of the LM's NLL on the data (behaviour cloning of pi_beta).
        awac_temperature: lambda of advantage-weighted BC (AWAC): each token's NLL weighs
            min(exp((min(Q-hat) - V) / lambda), 20); null: plain BC (trlX's default).
        polyak: Rate of the target heads' soft update after each optimizer step, (0, 1].
        num_epochs: Passes over the data. batch_size: Completions per optimizer step,
            over all ranks. micro_batch_size: Completions per forward/backward.
        shuffle: Reshuffle every epoch. optim: AdamW and its schedule.
    """

    data: str | None = None
    gamma: float = 0.99
    td_lambda: float = 0.0
    tau: float = 0.7
    v_coef: float = 1.0
    cql_coef: float = 0.1
    bc_coef: float = 1.0
    awac_temperature: float | None = None
    polyak: float = 0.05
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, lr_schedule="linear", warmup_fraction=0.05)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.data is None or bool(self.data.strip()), "data", "must not be empty")
        require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        require(0 < self.tau < 1, "tau", "must be in (0, 1)")
        require(0 <= self.td_lambda <= 1, "td_lambda", "must be in [0, 1]")
        for name in ("v_coef", "cql_coef", "bc_coef"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(0 < self.polyak <= 1, "polyak", "must be in (0, 1]")
        require(
            self.awac_temperature is None or self.awac_temperature > 0,
            "awac_temperature",
            "must be > 0 or null",
        )
