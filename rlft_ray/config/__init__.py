"""The run schema and its reader.

One frozen dataclass per algorithm (``PPOConfig``, ``DQNConfig``, ``GRPOConfig``, ...)
plus ``ResourcesConfig`` are the only schema; ``RunConfig`` groups them with the
environment and run-level fields. YAML run files, ``key=value`` CLI overrides and Ray
Tune search spaces address fields by dotted name (``ppo.lr``,
``resources.num_rollout_actors``) and go through :func:`build_config`, which checks
every key and type before any Ray work starts.

Where things live: the sections in :mod:`.gym` (env, PPO, DQN, filtered BC), :mod:`.lm`
(model, prompts, token PPO, RSFT), :mod:`.grpo` (the GRPO family),
:mod:`.preference` (DPO, online DPO, reward models, SimPO, ORPO, KTO), :mod:`.ilql` (ILQL) and :mod:`.run` (resources, the run); the reader in
:mod:`.parse`. Importing this package loads neither torch nor any learner.
"""

from rlft_ray.config.errors import ConfigError
from rlft_ray.config.grpo import GRPOConfig
from rlft_ray.config.gym import DQNConfig, EnvConfig, FilteredBCConfig, PPOConfig
from rlft_ray.config.ilql import ILQLConfig
from rlft_ray.config.lm import (
    KLEstimator,
    LMConfig,
    LMPPOConfig,
    LoRAConfig,
    LossAgg,
)
from rlft_ray.config.optim import LRSchedule, OptimConfig
from rlft_ray.config.parse import (
    OVERRIDE_ALIASES,
    build_config,
    config_yaml,
    flat_dict,
    from_dict,
    load_yaml,
    parse_override,
    save_config,
    set_dotted,
    to_dict,
)
from rlft_ray.config.preference import (
    DPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    ORPOConfig,
    RewardModelConfig,
    SimPOConfig,
)
from rlft_ray.config.rllib import RLlibConfig
from rlft_ray.config.rsft import RSFTConfig, Selection
from rlft_ray.config.run import ALGORITHMS, Algorithm, ResourcesConfig, RunConfig, TrackingConfig

__all__ = [
    "ALGORITHMS",
    "OVERRIDE_ALIASES",
    "Algorithm",
    "ConfigError",
    "DPOConfig",
    "DQNConfig",
    "EnvConfig",
    "FilteredBCConfig",
    "GRPOConfig",
    "ILQLConfig",
    "KLEstimator",
    "KTOConfig",
    "LMConfig",
    "LMPPOConfig",
    "LRSchedule",
    "LoRAConfig",
    "LossAgg",
    "ORPOConfig",
    "OnlineDPOConfig",
    "OptimConfig",
    "PPOConfig",
    "RLlibConfig",
    "RSFTConfig",
    "ResourcesConfig",
    "RewardModelConfig",
    "RunConfig",
    "Selection",
    "SimPOConfig",
    "TrackingConfig",
    "build_config",
    "config_yaml",
    "flat_dict",
    "from_dict",
    "load_yaml",
    "parse_override",
    "save_config",
    "set_dotted",
    "to_dict",
]
