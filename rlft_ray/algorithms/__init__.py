"""Pure-torch losses and advantage estimators.

Every function here takes tensors and explicit coefficients and returns tensors;
nothing in this package imports ``ray`` or reads a config object.
"""

from rlft_ray.algorithms.advantages import compute_gae, normalize_advantages
from rlft_ray.algorithms.dqn import dqn_loss, dqn_targets, polyak_update
from rlft_ray.algorithms.ilql import (
    awac_weights,
    cql_loss,
    expectile_loss,
    ilql_token_losses,
    td_targets,
    value_guided_logits,
)
from rlft_ray.algorithms.kto import kto_losses, kto_reference_point
from rlft_ray.algorithms.lm import (
    gapped_gae,
    group_advantages,
    kl_penalty,
    masked_gae,
    ppo_token_policy_losses,
    ppo_token_value_losses,
    selective_log_softmax,
    token_rewards,
)
from rlft_ray.algorithms.masked import (
    aggregate_loss_parts,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from rlft_ray.algorithms.ppo import ppo_policy_loss, ppo_value_loss
from rlft_ray.algorithms.preference import (
    bradley_terry_losses,
    dpo_losses,
    grm_losses,
    grm_sft_regularizer,
    orpo_losses,
    sequence_logps,
    simpo_losses,
)
from rlft_ray.algorithms.schedules import linear_schedule, lr_factor

__all__ = [
    "aggregate_loss_parts",
    "awac_weights",
    "bradley_terry_losses",
    "compute_gae",
    "cql_loss",
    "dpo_losses",
    "dqn_loss",
    "dqn_targets",
    "expectile_loss",
    "gapped_gae",
    "grm_losses",
    "grm_sft_regularizer",
    "group_advantages",
    "ilql_token_losses",
    "kl_penalty",
    "kto_losses",
    "kto_reference_point",
    "linear_schedule",
    "lr_factor",
    "masked_gae",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "normalize_advantages",
    "orpo_losses",
    "polyak_update",
    "ppo_policy_loss",
    "ppo_token_policy_losses",
    "ppo_token_value_losses",
    "ppo_value_loss",
    "selective_log_softmax",
    "sequence_logps",
    "simpo_losses",
    "td_targets",
    "token_rewards",
    "value_guided_logits",
]
