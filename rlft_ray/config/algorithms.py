"""Every algorithm, described once: its name, config section, learner, rollout actors and flags.

The schema (``algo``'s allowed values, which algorithms may sample asynchronously), the
learner registry, the rollout-actor module Ray's first workers preload, and the README's
algorithm table all read :data:`SPECS`. Adding an algorithm means: its config section (a
frozen dataclass and a :class:`~rlft_ray.config.run.RunConfig` field of the algorithm's
name), its learner, one line here, and its tests. Importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlft_ray.config.grpo import GRPOConfig
from rlft_ray.config.gym import DQNConfig, FilteredBCConfig, PPOConfig
from rlft_ray.config.ilql import ILQLConfig
from rlft_ray.config.lm import LMPPOConfig
from rlft_ray.config.preference import (
    DPOConfig,
    KTOConfig,
    OnlineDPOConfig,
    ORPOConfig,
    RewardModelConfig,
    SimPOConfig,
)
from rlft_ray.config.rllib import RLlibConfig
from rlft_ray.config.rsft import RSFTConfig

#: Rollout actor kinds -> ``module:class`` of the plain class the driver wraps with ``ray.remote``.
ROLLOUT_ACTORS: dict[str, str] = {
    "env_runner": "rlft_ray.rollout.env_runner:EnvRunner",
    "episodes": "rlft_ray.rollout.episodes:EpisodeCollector",
    "generation": "rlft_ray.rollout.generation:GenerationActor",
}


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm.

    Attributes:
        name: The ``algo:`` value, also the name of the run config's section.
        section: The section's frozen dataclass.
        learner: ``module:class`` of its learner (imported only when the algorithm runs).
        rollout: Key of :data:`ROLLOUT_ACTORS`: the actors it samples with; None: none.
        rollout_for_eval_only: Its actors only score held-out sets, so they start only
            with ``eval_every`` (offline DPO).
        async_ok: Its loss corrects for samples a version behind (a PPO/GRPO ratio against
            the recorded log-probs, or an off-policy learner): ``async_rollouts`` allowed.
        offline: It learns from its own data shard, not from the actors' samples.
        agents_ok: Without ``lm.prompts`` it trains an LM agent on multi-turn episodes of
            the text environment ``env`` (groups: episodes from one reset seed).
        summary: One line for the README's algorithm table.
    """

    name: str
    section: type
    learner: str
    rollout: str | None
    rollout_for_eval_only: bool = False
    async_ok: bool = False
    offline: bool = False
    agents_ok: bool = False
    summary: str = ""


SPECS: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec(
        "ppo",
        PPOConfig,
        "rlft_ray.learners.ppo:PPOLearner",
        "env_runner",
        async_ok=True,
        summary="PPO-clip with GAE for gymnasium tasks (Schulman et al. 2017)",
    ),
    AlgorithmSpec(
        "dqn",
        DQNConfig,
        "rlft_ray.learners.dqn:DQNLearner",
        "env_runner",
        async_ok=True,
        summary="double DQN, replay filled by the env runners (van Hasselt et al. 2016)",
    ),
    AlgorithmSpec(
        "filtered_bc",
        FilteredBCConfig,
        "rlft_ray.learners.filtered_bc:FilteredBCLearner",
        "episodes",
        summary="behaviour cloning of the episodes kept by return (filtered BC)",
    ),
    AlgorithmSpec(
        "grpo",
        GRPOConfig,
        "rlft_ray.learners.grpo:GRPOLearner",
        "generation",
        async_ok=True,
        agents_ok=True,
        summary="GRPO family: GRPO, DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE(++) (Shao et al. 2024)",
    ),
    AlgorithmSpec(
        "lm_ppo",
        LMPPOConfig,
        "rlft_ray.learners.lm_ppo:LMPPOLearner",
        "generation",
        async_ok=True,
        agents_ok=True,
        summary="token-level PPO with a value head, KL in the reward (Ouyang et al. 2022)",
    ),
    AlgorithmSpec(
        "rsft",
        RSFTConfig,
        "rlft_ray.learners.rsft:RSFTLearner",
        "generation",
        agents_ok=True,
        summary="rejection-sampling fine-tuning: expert iteration / ReST / RAFT rounds",
    ),
    AlgorithmSpec(
        "dpo",
        DPOConfig,
        "rlft_ray.learners.dpo:DPOLearner",
        "generation",
        rollout_for_eval_only=True,
        offline=True,
        summary="DPO / IPO / cDPO / hinge from preference pairs (Rafailov et al. 2023)",
    ),
    AlgorithmSpec(
        "online_dpo",
        OnlineDPOConfig,
        "rlft_ray.learners.online_dpo:OnlineDPOLearner",
        "generation",
        summary="DPO on best/worst pairs of the actors' samples (Guo et al. 2024)",
    ),
    AlgorithmSpec(
        "reward_model",
        RewardModelConfig,
        "rlft_ray.learners.reward_model:RewardModelLearner",
        None,
        offline=True,
        summary="Bradley-Terry reward model on preference pairs (Ouyang et al. 2022)",
    ),
    AlgorithmSpec(
        "simpo",
        SimPOConfig,
        "rlft_ray.learners.ref_free:SimPOLearner",
        "generation",
        rollout_for_eval_only=True,
        offline=True,
        summary="SimPO: reference-free, length-normalised, target margin (Meng et al. 2024)",
    ),
    AlgorithmSpec(
        "orpo",
        ORPOConfig,
        "rlft_ray.learners.ref_free:ORPOLearner",
        "generation",
        rollout_for_eval_only=True,
        offline=True,
        summary="ORPO: SFT + odds-ratio preference term, no reference (Hong et al. 2024)",
    ),
    AlgorithmSpec(
        "kto",
        KTOConfig,
        "rlft_ray.learners.kto:KTOLearner",
        "generation",
        rollout_for_eval_only=True,
        offline=True,
        summary="KTO from unpaired desirable/undesirable completions (Ethayarajh et al. 2024)",
    ),
    AlgorithmSpec(
        "ilql",
        ILQLConfig,
        "rlft_ray.learners.ilql:ILQLLearner",
        "generation",
        rollout_for_eval_only=True,
        offline=True,
        summary="ILQL: offline token-level Q-learning, value-guided decoding (Snell et al. 2022)",
    ),
    AlgorithmSpec(
        "rllib",
        RLlibConfig,
        "rlft_ray.learners.rllib:RLlibLearner",
        None,
        summary="an RLlib algorithm (PPO, SAC, APPO, IMPALA, DQN, CQL, BC, MARWIL), "
        "multi-agent envs too, in the run directory (needs `rlft-ray[rllib]`)",
    ),
)

#: The ``algo:`` values, in table order.
ALGORITHMS: tuple[str, ...] = tuple(spec.name for spec in SPECS)
BY_NAME: dict[str, AlgorithmSpec] = {spec.name: spec for spec in SPECS}


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The spec of ``algo: name``."""
    return BY_NAME[name]


def markdown_table() -> str:
    """The README's algorithm table (a test keeps the README's copy equal to it)."""
    rows = ["| `algo` | section | rollout actors | async | what it is |", "|---|---|---|---|---|"]
    for s in SPECS:
        actors = s.rollout or "none"
        if s.rollout_for_eval_only:
            actors += " (eval only)"
        rows.append(
            f"| `{s.name}` | `{s.section.__name__}` | {actors} | {'yes' if s.async_ok else 'no'} "
            f"| {s.summary} |"
        )
    return "\n".join(rows) + "\n"
