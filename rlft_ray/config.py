"""The run schema: frozen dataclasses, YAML files and dotted overrides.

One frozen dataclass per algorithm (``PPOConfig``, ``DQNConfig``, ...) plus
``ResourcesConfig`` are the only schema. ``RunConfig`` groups them with the
environment and run-level fields. YAML run files, ``key=value`` CLI overrides and
Ray Tune search spaces all address fields by their dotted name
(``ppo.lr``, ``resources.num_rollout_actors``) and go through :func:`build_config`,
which checks every key and type before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range. The message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.reason = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with both arguments: Ray ships errors raised in actors and Tune trials.
        return (type(self), (self.key, self.reason))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class EnvConfig:
    """Which environment the env runners step.

    Attributes:
        id: A registered gymnasium id (``CartPole-v1``, ``rlft/Navigation-v0``, ...).
        kwargs: Keyword arguments for ``gymnasium.make`` (e.g. ``goal``, ``action_type``).
        num_envs_per_runner: Sub-environments in each runner's vector env.
        max_episode_steps: Optional override of the env's time limit.
    """

    id: str = "CartPole-v1"
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_envs_per_runner: int = 4
    max_episode_steps: int | None = None

    def __post_init__(self) -> None:
        _require(bool(self.id), "id", "must name a gymnasium environment id")
        _require(self.num_envs_per_runner >= 1, "num_envs_per_runner", "must be >= 1")
        _require(
            self.max_episode_steps is None or self.max_episode_steps >= 1,
            "max_episode_steps",
            "must be >= 1 or null",
        )


@dataclass(frozen=True)
class ResourcesConfig:
    """What the run asks of the Ray cluster.

    Attributes:
        num_rollout_actors: Env-runner (or generation) actors sampling in parallel.
        cpus_per_rollout_actor: CPUs each rollout actor holds (fractions allowed);
            torch in the actor uses ``max(1, floor(cpus))`` threads.
        num_learners: Ray Train workers (DDP when > 1).
        cpus_per_learner: CPUs each learner worker holds.
        use_gpu: Put each learner on one GPU (NCCL, bf16 autocast).
        gpus_per_rollout_actor: GPUs each rollout actor holds (generation actors then
            sample on CUDA; fractions share a GPU).
        max_actor_restarts: How often Ray restarts a dead rollout actor.
        max_failures: Ray Train worker-group restarts from the last checkpoint.
        storage_path: Where Ray Train persists checkpoints (shared path or ``s3://``
            URI on multi-node clusters). Defaults to the run's output directory.
        rollout_actor_resources: Custom Ray resources each rollout actor requires on
            top of its CPUs (e.g. ``{"rollout_node": 1}`` to place actors only on nodes
            started with ``--resources='{"rollout_node": 8}'``).
        learner_resources: Custom Ray resources each learner worker requires (e.g.
            ``{"learner_node": 1}``), passed to Ray Train's ``resources_per_worker``.
    """

    num_rollout_actors: int = 2
    cpus_per_rollout_actor: float = 0.5
    num_learners: int = 1
    cpus_per_learner: float = 1.0
    use_gpu: bool = False
    gpus_per_rollout_actor: float = 0.0
    max_actor_restarts: int = 3
    max_failures: int = 0
    storage_path: str | None = None
    rollout_actor_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rollout_actor_resources", "learner_resources"):
            for res, amount in getattr(self, name).items():
                # CPU/GPU have their own fields; Ray rejects them in custom resources.
                _require(
                    res not in ("CPU", "GPU", "memory"),
                    f"{name}.{res}",
                    "use cpus_per_* / use_gpu instead",
                )
                _require(
                    isinstance(amount, (int, float))
                    and not isinstance(amount, bool)
                    and amount > 0,
                    f"{name}.{res}",
                    f"must be a number > 0 (got {amount!r})",
                )
        _require(self.num_rollout_actors >= 1, "num_rollout_actors", "must be >= 1")
        _require(self.gpus_per_rollout_actor >= 0, "gpus_per_rollout_actor", "must be >= 0")
        _require(self.cpus_per_rollout_actor > 0, "cpus_per_rollout_actor", "must be > 0")
        _require(self.num_learners >= 1, "num_learners", "must be >= 1")
        _require(self.cpus_per_learner > 0, "cpus_per_learner", "must be > 0")
        _require(self.max_actor_restarts >= 0, "max_actor_restarts", "must be >= 0")
        _require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: unlimited)")

    @property
    def total_cpus(self) -> float:
        """CPUs the run needs: rollout actors plus learner workers."""
        return (
            self.num_rollout_actors * self.cpus_per_rollout_actor
            + self.num_learners * self.cpus_per_learner
        )


@dataclass(frozen=True)
class PPOConfig:
    """PPO with GAE, clipped surrogate and clipped value loss (Schulman et al. 2017).

    Defaults follow CleanRL's ``ppo.py`` and the 37 implementation details
    (Huang et al. 2022), tuned for CartPole-v1 on 2 env runners.
    """

    lr: float = 1e-3
    anneal_lr: bool = True
    rollout_steps: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_epochs: int = 6
    num_minibatches: int = 4
    norm_adv: bool = True
    clip_coef: float = 0.2
    clip_vloss: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    hidden_sizes: tuple[int, ...] = (64, 64)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _require(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
        _require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        _require(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
        _require(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        _require(self.num_minibatches >= 1, "num_minibatches", "must be >= 1")
        _require(self.clip_coef > 0, "clip_coef", f"must be > 0 (got {self.clip_coef})")
        _require(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        _require(self.ent_coef >= 0, "ent_coef", "must be >= 0")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0")
        _require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "sizes must be >= 1")


@dataclass(frozen=True)
class DQNConfig:
    """Double DQN with replay and a target network (Mnih et al. 2015; van Hasselt et al. 2016).

    ``tau=1.0`` copies the online net into the target every ``target_update_interval``
    gradient steps (hard update); ``tau<1`` does a Polyak update at that interval.
    Exploration ε decays linearly from ``eps_start`` to ``eps_end`` over
    ``exploration_fraction`` of ``total_env_steps``.
    """

    lr: float = 5e-4
    rollout_steps: int = 16
    buffer_size: int = 50_000
    learning_starts: int = 1_000
    batch_size: int = 128
    updates_per_iteration: int = 32
    gamma: float = 0.99
    double_dqn: bool = True
    tau: float = 1.0
    target_update_interval: int = 250
    eps_start: float = 1.0
    eps_end: float = 0.02
    exploration_fraction: float = 0.3
    max_grad_norm: float = 10.0
    hidden_sizes: tuple[int, ...] = (128, 128)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _require(self.rollout_steps >= 1, "rollout_steps", "must be >= 1")
        _require(self.buffer_size >= self.batch_size, "buffer_size", "must be >= batch_size")
        _require(self.learning_starts >= 0, "learning_starts", "must be >= 0")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.updates_per_iteration >= 1, "updates_per_iteration", "must be >= 1")
        _require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        _require(0 < self.tau <= 1, "tau", f"must be in (0, 1] (got {self.tau})")
        _require(self.target_update_interval >= 1, "target_update_interval", "must be >= 1")
        _require(
            0 <= self.eps_end <= self.eps_start <= 1,
            "eps_end",
            "need 0 <= eps_end <= eps_start <= 1",
        )
        _require(0 < self.exploration_fraction <= 1, "exploration_fraction", "must be in (0, 1]")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", "sizes must be >= 1")


@dataclass(frozen=True)
class LMConfig:
    """A causal language model, its prompts, reward and sampling (for the LM algorithms).

    Attributes:
        model: Local directory or hub id of a causal LM (``AutoModelForCausalLM``);
            also where the generation actors and the frozen reference model load from.
        tokenizer: Tokenizer path or id (default: ``model``). A tokenizer without a pad
            token gets ``pad = eos`` (or an added ``<pad>``).
        trust_remote_code: Allow custom modelling code shipped with the checkpoint.
        dtype: Weights dtype of the model (``float32``, ``bfloat16``, ``auto``); on GPU the
            learner trains fp32 master weights under bf16 autocast either way.
        chat_template: Render each prompt as a user message with the tokenizer's chat
            template (plus the generation prompt) instead of using it verbatim.
        system_prompt: Optional system message when ``chat_template`` is on.
        prompts: Training prompts, a ``.jsonl``/``.json`` or ``.parquet`` file with a
            ``prompt`` column and optional ``answer``/``ground_truth`` and metadata columns.
        eval_prompts: Held-out prompts for ``rlft-ray eval`` and the quickstart.
        prompt_key: Column holding the prompt text.
        max_prompt_tokens: Longest prompt (in tokens, after the chat template).
        prompt_overflow: What to do with longer prompts: ``drop`` them, ``truncate`` them
            (keeping the last ``max_prompt_tokens`` tokens) or ``error``. Counted either way.
        drop_empty_prompts: Drop (and count) empty prompts instead of failing.
        reward_fn: ``package.module:function`` called as ``fn(prompts, completions, metadata)``.
        eval_fn: Same signature; its mean over greedy completions is the eval accuracy.
        prompts_per_iteration: Prompts sampled per iteration over all actors (each gets
            ``num_samples`` completions).
        num_samples: Completions per prompt (the group size of GRPO/RLOO).
        temperature: Sampling temperature (log-probs are of the temperature-scaled policy).
        top_p: Nucleus sampling threshold (1.0: off).
        max_new_tokens: Longest completion; generation also stops at EOS.
        generation_batch_size: Most sequences one ``generate`` call holds (bounds memory).
        shuffle: Reshuffle the prompts every epoch.
        track_kl: Keep a frozen reference model to report ``kl/mean`` even with a KL
            coefficient of 0 (a reference is always kept when the coefficient is > 0).
    """

    model: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"
    chat_template: bool = False
    system_prompt: str | None = None
    prompts: str | None = None
    eval_prompts: str | None = None
    prompt_key: str = "prompt"
    max_prompt_tokens: int = 256
    prompt_overflow: Literal["drop", "truncate", "error"] = "drop"
    drop_empty_prompts: bool = False
    reward_fn: str = "envs.arithmetic:exact_match"
    eval_fn: str = "envs.arithmetic:exact_match"
    prompts_per_iteration: int = 16
    num_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    generation_batch_size: int = 256
    shuffle: bool = True
    track_kl: bool = True

    def __post_init__(self) -> None:
        _require(self.model is None or bool(self.model.strip()), "model", "must not be empty")
        _require(
            self.dtype in ("float32", "bfloat16", "float16", "auto"),
            "dtype",
            "must be float32, bfloat16, float16 or auto",
        )
        _require(bool(self.prompt_key), "prompt_key", "must name a column")
        _require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        _require(
            ":" in self.reward_fn,
            "reward_fn",
            f"must look like 'package.module:function' (got {self.reward_fn!r})",
        )
        _require(
            ":" in self.eval_fn,
            "eval_fn",
            f"must look like 'package.module:function' (got {self.eval_fn!r})",
        )
        _require(self.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(self.temperature > 0, "temperature", f"must be > 0 (got {self.temperature})")
        _require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})")
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _require(self.generation_batch_size >= 1, "generation_batch_size", "must be >= 1")


def _check_lm_optim(cfg: Any) -> None:
    """Checks shared by the LM algorithm sections (field names are the same in each)."""
    _require(cfg.lr > 0, "lr", f"must be > 0 (got {cfg.lr})")
    _require(
        cfg.warmup_fraction >= 0 and cfg.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"
    )
    _require(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    _require(cfg.num_epochs >= 1, "num_epochs", "must be >= 1")
    _require(cfg.num_minibatches >= 1, "num_minibatches", "must be >= 1")
    _require(cfg.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    _require(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    _require(cfg.clip_low > 0, "clip_low", f"must be > 0 (got {cfg.clip_low})")
    _require(cfg.clip_high is None or cfg.clip_high > 0, "clip_high", "must be > 0 or null")
    _require(cfg.kl_coef >= 0, "kl_coef", f"must be >= 0 (got {cfg.kl_coef})")


LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k2", "k3"]
LRSchedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class GRPOConfig:
    """Critic-free policy gradient with group baselines: GRPO, RLOO or REINFORCE.

    Defaults follow GRPO in DeepSeekMath (Shao et al. 2024): group-normalised
    advantages, one update per batch, clip 0.2, k3 KL to the reference in the loss
    with beta = 0.04, sequence-mean-token-mean loss, lr 1e-6.

    Attributes:
        estimator: ``grpo`` (r - mean) / std per group, ``rloo`` leave-one-out mean
            (Ahmadian et al. 2024), ``reinforce`` batch-mean baseline.
        std_normalize: Divide GRPO advantages by the group std (false: Dr. GRPO).
        kl_coef: beta, weight of KL(pi || pi_ref).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman 2020).
        kl_in: Put the KL penalty in the ``loss`` (GRPO) or subtract it from the
            sequence ``reward`` before the advantages (RLOO paper).
        clip_low: PPO-clip epsilon (lower); ``clip_high`` the upper one (null: same).
        num_epochs: Passes over each batch. num_minibatches: optimizer steps per pass.
        micro_batch_size: Sequences per forward/backward; gradients accumulate over a
            minibatch's micro-batches (and average over DDP ranks) before each step.
        loss_agg: ``token-mean``, ``seq-mean-token-mean`` or ``seq-mean-token-sum``.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` decay over the run, after a
            linear warmup over ``warmup_fraction`` of it.
    """

    estimator: Literal["grpo", "rloo", "reinforce"] = "grpo"
    std_normalize: bool = True
    lr: float = 1e-6
    lr_schedule: LRSchedule = "constant"
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    kl_coef: float = 0.04
    kl_estimator: KLEstimator = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    clip_low: float = 0.2
    clip_high: float | None = None
    num_epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int = 8
    loss_agg: LossAgg = "seq-mean-token-mean"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check_lm_optim(self)


@dataclass(frozen=True)
class LMPPOConfig:
    """Token-level PPO with a value head, GAE and the KL penalty in the reward.

    Defaults follow Ziegler et al. 2019 / Ouyang et al. 2022 as implemented in TRL:
    per-token reward ``-kl_coef * k1`` plus the score on the last token, GAE with
    gamma = 1, lambda = 0.95, whitened advantages, 4 PPO epochs, clipped value loss
    with vf_coef 0.1.

    Attributes:
        gamma / gae_lambda: GAE over response tokens.
        vf_coef: Weight of the value loss. value_clip: Value clipping range (null: off).
        whiten_advantages: Standardise advantages over the batch's tokens.
        value_head_init_std: Std of the value head's initial weights.
        (Optimizer, clipping, micro-batching and KL fields as in :class:`GRPOConfig`.)
    """

    lr: float = 1e-6
    lr_schedule: LRSchedule = "constant"
    warmup_fraction: float = 0.0
    weight_decay: float = 0.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float = 0.1
    value_clip: float | None = 0.2
    whiten_advantages: bool = True
    value_head_init_std: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: KLEstimator = "k1"
    clip_low: float = 0.2
    clip_high: float | None = None
    num_epochs: int = 4
    num_minibatches: int = 1
    micro_batch_size: int = 8
    loss_agg: LossAgg = "token-mean"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check_lm_optim(self)
        _require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1] (got {self.gamma})")
        _require(0 <= self.gae_lambda <= 1, "gae_lambda", "must be in [0, 1]")
        _require(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        _require(
            self.value_clip is None or self.value_clip > 0, "value_clip", "must be > 0 or null"
        )
        _require(self.value_head_init_std >= 0, "value_head_init_std", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: algorithm, environment, resources and run-level knobs.

    Attributes:
        algo: Registered algorithm name (``ppo``, ``dqn``, ...).
        env: Environment section.
        ppo: PPO hyperparameters (used when ``algo == "ppo"``).
        dqn: DQN hyperparameters (used when ``algo == "dqn"``).
        lm: Language model, prompts, reward and sampling (LM algorithms).
        grpo: GRPO / RLOO / REINFORCE hyperparameters (used when ``algo == "grpo"``).
        lm_ppo: Token-level PPO hyperparameters (used when ``algo == "lm_ppo"``).
        resources: Cluster resources.
        total_env_steps: Stop after this many environment steps (for LM algorithms a
            step is one sampled completion).
        total_iterations: Also stop after this many iterations (sample + update), if set.
        stop_return: Stop early once the mean return of the last 20 episodes reaches it.
        stop_success_rate: Stop early once the success rate (``info["is_success"]``) of
            the last 20 episodes reaches it.
        seed: Seeds torch, numpy, python and the environments.
        init_from: A checkpoint directory whose policy (and Q-network) to start from.
        checkpoint_every: Iterations between checkpoints (the last one is always saved).
        keep_checkpoints: Ray Train checkpoints kept (the best is kept on top of these).
        report_interval_s: Seconds between metric reports to Ray Train (each report
            carries every iteration's row, so ``metrics.jsonl`` stays complete).
    """

    algo: str = "ppo"
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lm_ppo: LMPPOConfig = field(default_factory=LMPPOConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    total_env_steps: int = 200_000
    total_iterations: int | None = None
    stop_return: float | None = None
    stop_success_rate: float | None = None
    seed: int = 0
    init_from: str | None = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    report_interval_s: float = 1.0

    def __post_init__(self) -> None:
        from rlft_ray.registry import algorithm_names  # late: registry imports learners

        names = algorithm_names()
        if self.algo not in names:
            near = difflib.get_close_matches(self.algo, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(
                "algo", f"unknown algorithm '{self.algo}' (known: {', '.join(names)}){hint}"
            )
        _require(self.total_env_steps >= 1, "total_env_steps", "must be >= 1")
        _require(
            self.total_iterations is None or self.total_iterations >= 1,
            "total_iterations",
            "must be >= 1 or null",
        )
        _require(
            self.stop_success_rate is None or 0 < self.stop_success_rate <= 1,
            "stop_success_rate",
            "must be in (0, 1] or null",
        )
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _require(self.report_interval_s >= 0, "report_interval_s", "must be >= 0")
        _require(
            self.resources.num_rollout_actors % self.resources.num_learners == 0,
            "resources.num_rollout_actors",
            f"must be a multiple of resources.num_learners ({self.resources.num_learners}) "
            "so every DDP rank samples the same amount",
        )

    @property
    def algo_config(self) -> Any:
        """The section of the selected algorithm (e.g. ``self.ppo``)."""
        return getattr(self, self.algo)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" as a string; accept it as the float it means.
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a float, got {value!r}") from None
        else:
            raise ConfigError(key, f"expected a float, got {value!r}")
        if math.isnan(out):
            raise ConfigError(key, "must not be NaN")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(key, f"unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a nested mapping, checking every key.

    Args:
        cls: A config dataclass (e.g. :class:`RunConfig`).
        data: Nested mapping of field values; missing fields take defaults.
        prefix: Dotted path of ``cls`` inside the run config, for error messages.

    Returns:
        The constructed dataclass instance.

    Raises:
        ConfigError: Unknown key (with the nearest valid one), wrong type or
            out-of-range value; the message names the full dotted key.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            raise ConfigError(dotted, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not exc.key.startswith(prefix + "."):
            raise ConfigError(f"{prefix}.{exc.key}", exc.reason) from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict of ``cfg`` (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    """Split a ``dotted.key=value`` CLI override; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(item, "overrides look like dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(item, "override has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key == "a.b.c"``, creating mappings as needed."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, cannot set '{key}' below it")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML run file into a mapping, with a clear error for bad files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"run file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{p} must hold a mapping of config keys at top level")
    return data


#: Short override names for common keys (``rlft-ray train run.yaml model=out/tiny-gpt2``).
OVERRIDE_ALIASES: dict[str, str] = {"model": "lm.model", "prompts": "lm.prompts"}


def build_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML file plus dotted overrides.

    Args:
        path: Optional YAML run file.
        overrides: ``["ppo.lr=3e-4", ...]`` strings or a ``{"ppo.lr": 3e-4}`` mapping
            (the latter is what Tune search spaces produce). Keys in
            :data:`OVERRIDE_ALIASES` (``model`` -> ``lm.model``) are expanded.
        base: Optional nested mapping applied before the file (e.g. a saved config).

    Returns:
        The validated, frozen run config.

    Raises:
        ConfigError: Naming the offending key.
    """
    data: dict[str, Any] = {}
    for source in (base or {}, load_yaml(path) if path else {}):
        _deep_merge(data, source)
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(data, OVERRIDE_ALIASES.get(key, key), value)
    return from_dict(RunConfig, data)


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = dict(value) if isinstance(value, Mapping) else value


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from rlft_ray.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
