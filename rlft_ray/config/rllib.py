"""Schema of ``algo: rllib``: an RLlib algorithm by name and the settings of its ``AlgorithmConfig``.

Only the shape is checked here (the schema loads no RLlib): the keys of ``config`` are
checked against the chosen algorithm's ``AlgorithmConfig`` (and its own ``validate``)
when the run starts, before any Ray work, by :mod:`rlft_ray.learners.rllib`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlft_ray.config.errors import require

#: The RLlib algorithms ``rllib.algorithm`` accepts (RLlib's registered names, new API stack).
RLLIB_ALGORITHMS: tuple[str, ...] = ("PPO", "SAC", "APPO", "IMPALA", "DQN", "CQL", "BC", "MARWIL")
#: Offline algorithms: they read ``config.input_`` (recorded episodes), not the env's samples.
RLLIB_OFFLINE: tuple[str, ...] = ("CQL", "BC", "MARWIL")


@dataclass(frozen=True)
class RLlibConfig:
    """An RLlib algorithm (new API stack) trained inside rlft-ray's run directory.

    Attributes:
        algorithm: RLlib's name of the algorithm (``PPO``, ``SAC``, ``APPO``, ``IMPALA``,
            ``DQN``, ``CQL``, ``BC``, ``MARWIL``).
        config: Settings of that algorithm's ``AlgorithmConfig``, by RLlib's attribute
            names (``lr``, ``gamma``, ``train_batch_size_per_learner``, ``num_env_runners``,
            ``num_epochs``, ``model_config``, ``input_``, ...): passed to
            ``AlgorithmConfig.update_from_dict``. A key the algorithm's config does not
            have fails naming it (``rllib.config.<key>``) before Ray starts. The env
            (``env.id``, ``env.kwargs``), ``env.num_envs_per_runner`` and ``seed`` come from
            the run config; ``config`` may override ``num_envs_per_env_runner``.
        policies: Multi-agent environments: ``shared`` (one RLModule all agents act
            with) or ``per_agent`` (one RLModule per agent id). Ignored for
            single-agent environments.
    """

    algorithm: Literal[RLLIB_ALGORITHMS] = "PPO"  # type: ignore[valid-type]
    config: dict[str, Any] = field(default_factory=dict)
    policies: Literal["shared", "per_agent"] = "shared"

    def __post_init__(self) -> None:
        for key in self.config:
            require(
                isinstance(key, str) and key.isidentifier(),
                f"config.{key}",
                "must be an AlgorithmConfig attribute name",
            )
        for key in ("env", "env_config", "seed"):
            require(
                key not in self.config,
                f"config.{key}",
                "comes from the run config (env.id, env.kwargs, seed); set it there",
            )
