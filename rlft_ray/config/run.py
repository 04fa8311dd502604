"""Schema of a whole run: cluster resources and the run config that groups every section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlft_ray.config.algorithms import ALGORITHMS, SPECS
from rlft_ray.config.errors import require
from rlft_ray.config.grpo import GRPOConfig
from rlft_ray.config.gym import DQNConfig, EnvConfig, FilteredBCConfig, PPOConfig
from rlft_ray.config.ilql import ILQLConfig
from rlft_ray.config.lm import LMConfig, LMPPOConfig
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

#: The algorithm names ``algo:`` accepts (one :class:`~rlft_ray.config.algorithms.AlgorithmSpec`
#: each). Each is also the name of the section holding its hyperparameters.
Algorithm = Literal[ALGORITHMS]  # type: ignore[valid-type]
#: What ``async_rollouts`` allows: algorithms whose loss corrects for a version's lag.
ASYNC_ALGORITHMS: tuple[str, ...] = tuple(s.name for s in SPECS if s.async_ok)


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run's metrics go besides ``metrics.jsonl``.

    Attributes:
        tensorboard: Write TensorBoard event files to ``tensorboard/`` in the run
            directory: every ``metrics.jsonl`` key as a scalar against
            ``counters/iteration``, and the resolved config as text
            (``tensorboard --logdir runs/``).
        mlflow_uri: Also log to MLflow at this tracking URI (``file:./mlruns``, a path, or
            a server ``http://host:5000``): the config as parameters, every metric per
            iteration, one MLflow run per run directory. Needs ``rlft-ray[tracking]``.
        mlflow_experiment: The MLflow experiment the runs go into.
        wandb_project: Also log to Weights & Biases under this project (needs
            ``rlft-ray[tracking]``); the run's files go to ``wandb/`` in the run directory.
        wandb_mode: ``offline`` (default: nothing leaves the machine; ``wandb sync``
            uploads later) or ``online``.
    """

    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "rlft_ray"
    wandb_project: str | None = None
    wandb_mode: Literal["offline", "online"] = "offline"

    def __post_init__(self) -> None:
        require(
            self.mlflow_uri is None or bool(self.mlflow_uri.strip()),
            "mlflow_uri",
            "must not be empty",
        )
        require(bool(self.mlflow_experiment.strip()), "mlflow_experiment", "must not be empty")
        require(
            self.wandb_project is None or bool(self.wandb_project.strip()),
            "wandb_project",
            "must not be empty",
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
        max_failures: Learner restarts after a failure, each from the run directory's
            ``checkpoint_last`` (-1: unlimited). Deterministic failures (NaN loss, a
            reward function that raises, bad data) are never retried.
        sample_timeout_s: Longest wait for one sampling call of a rollout actor; an
            actor that does not answer in time (a hanging reward function, a stopped
            process) is restarted (``max_actor_restarts``), then the run fails naming it.
        storage_path: Where Ray Train keeps its checkpoint copies (shared path or
            ``s3://`` URI on multi-node clusters, where the learners also read the
            checkpoint a resume starts from). Default: ``ray_train/`` in the run directory.
        rollout_actor_resources: Custom Ray resources each rollout actor requires on
            top of its CPUs (e.g. ``{"rollout_node": 1}`` to place actors only on nodes
            started with ``--resources='{"rollout_node": 8}'``).
        learner_resources: Custom Ray resources each learner worker requires (e.g.
            ``{"learner_node": 1}``), passed to Ray Train's ``resources_per_worker``.
        num_scorer_actors: Reward-model actors serving ``lm.reward_model`` (the generation
            actors send them their completions in batches).
        cpus_per_scorer_actor: CPUs each scorer actor holds; none by default, since a
            generation actor waits while its scorer works (they take turns on its CPUs).
        gpus_per_scorer_actor: GPUs each scorer actor holds; null: a 0.1 share when the
            cluster has GPUs, else none.
        threads_per_learner: torch threads of each learner; null: the CPUs it holds
            (``floor(cpus_per_learner)``, at least 1). A synchronous run's actors and
            learner take turns (sample, then update), so on one machine each may use all
            its cores while the other waits: the real-model example gives both 2 threads on
            2 cores, and the update, most of an iteration, runs twice as fast.
        threads_per_rollout_actor: The same for each rollout actor; null: from its CPUs.
        learner_in_driver: On Ray started by the run itself (no cluster address), one
            CPU learner runs in the driver process, in Ray Train's local mode
            (``num_workers=0``: same loop, same reports), instead of a Train controller and
            worker process that take seconds to start on a small machine. Not with more
            learners, a GPU, a Ray Dataset or in a Tune trial; never on a cluster. False:
            the learner runs in a Ray Train worker as it does on a cluster.
    """

    num_rollout_actors: int = 2
    cpus_per_rollout_actor: float = 0.5
    num_learners: int = 1
    cpus_per_learner: float = 1.0
    use_gpu: bool = False
    gpus_per_rollout_actor: float = 0.0
    max_actor_restarts: int = 3
    max_failures: int = 0
    sample_timeout_s: float = 600.0
    storage_path: str | None = None
    rollout_actor_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)
    num_scorer_actors: int = 1
    cpus_per_scorer_actor: float = 0.0
    gpus_per_scorer_actor: float | None = None
    learner_in_driver: bool = True
    threads_per_learner: int | None = None
    threads_per_rollout_actor: int | None = None

    def __post_init__(self) -> None:
        for name in ("rollout_actor_resources", "learner_resources"):
            for res, amount in getattr(self, name).items():
                # CPU/GPU have their own fields; Ray rejects them in custom resources.
                require(
                    res not in ("CPU", "GPU", "memory"),
                    f"{name}.{res}",
                    "use cpus_per_* / use_gpu instead",
                )
                require(
                    isinstance(amount, (int, float))
                    and not isinstance(amount, bool)
                    and amount > 0,
                    f"{name}.{res}",
                    f"must be a number > 0 (got {amount!r})",
                )
        require(self.num_rollout_actors >= 1, "num_rollout_actors", "must be >= 1")
        require(self.gpus_per_rollout_actor >= 0, "gpus_per_rollout_actor", "must be >= 0")
        require(self.cpus_per_rollout_actor > 0, "cpus_per_rollout_actor", "must be > 0")
        require(self.num_learners >= 1, "num_learners", "must be >= 1")
        require(self.cpus_per_learner > 0, "cpus_per_learner", "must be > 0")
        require(self.max_actor_restarts >= 0, "max_actor_restarts", "must be >= 0")
        require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: unlimited)")
        require(self.sample_timeout_s > 0, "sample_timeout_s", "must be > 0 seconds")
        require(self.num_scorer_actors >= 1, "num_scorer_actors", "must be >= 1")
        for name in ("threads_per_learner", "threads_per_rollout_actor"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, "must be >= 1 or null")
        require(self.cpus_per_scorer_actor >= 0, "cpus_per_scorer_actor", "must be >= 0")
        require(
            self.gpus_per_scorer_actor is None or self.gpus_per_scorer_actor >= 0,
            "gpus_per_scorer_actor",
            "must be >= 0 or null",
        )


@dataclass(frozen=True)
class RunConfig:
    """A whole run: algorithm, environment, resources and run-level knobs.

    Attributes:
        algo: Which algorithm trains (one of :data:`ALGORITHMS`; its
            :class:`~rlft_ray.config.algorithms.AlgorithmSpec` names its learner).
        env: Environment section.
        ppo: PPO hyperparameters (used when ``algo == "ppo"``).
        dqn: DQN hyperparameters (used when ``algo == "dqn"``).
        lm: Language model, prompts, reward and sampling (LM algorithms).
        grpo: GRPO / RLOO / REINFORCE hyperparameters (used when ``algo == "grpo"``).
        lm_ppo: Token-level PPO hyperparameters (used when ``algo == "lm_ppo"``).
        rsft: Rejection sampling and fine-tuning on the accepted samples (``algo == "rsft"``,
            and the selection of ``rlft-ray sample``).
        filtered_bc: Filtered behaviour cloning on env-runner episodes (``algo == "filtered_bc"``).
        dpo: Offline DPO / IPO / cDPO from ``lm.pairs`` (``algo == "dpo"``).
        online_dpo: DPO on pairs ranked from the actors' samples (``algo == "online_dpo"``).
        reward_model: A Bradley-Terry reward model on ``lm.pairs`` (``algo == "reward_model"``).
        simpo: Reference-free SimPO from ``lm.pairs`` (``algo == "simpo"``).
        orpo: ORPO (SFT + odds ratio) from ``lm.pairs`` (``algo == "orpo"``).
        kto: KTO from unpaired labelled completions (``algo == "kto"``).
        ilql: ILQL from a reward-labelled offline set (``algo == "ilql"``).
        rllib: An RLlib algorithm and its ``AlgorithmConfig`` settings (``algo == "rllib"``).
        resources: Cluster resources.
        tracking: Metric sinks besides ``metrics.jsonl`` (TensorBoard).
        total_env_steps: Stop after this many environment steps (for LM algorithms a
            step is one sampled completion).
        total_iterations: Also stop after this many iterations (sample + update), if set.
        time_limit_s: Also stop after this many seconds of training (the loop's clock,
            which continues across ``--resume``), if set.
        stop_return: Stop early once the mean return of the last 20 episodes reaches it.
        stop_success_rate: Stop early once the success rate (``info["is_success"]``) of
            the last 20 episodes reaches it.
        seed: Seeds torch, numpy, python and the environments.
        init_from: A checkpoint directory whose policy (and Q-network) to start from; for
            gym policies and ``algo: rllib`` also an RLlib checkpoint of a single-agent
            PPO / DQN / SAC RLModule with the default MLP encoders (mapped layer by layer).
        checkpoint_every: Iterations between checkpoints (the last one is always saved).
        keep_checkpoints: Ray Train checkpoints kept (the best is kept on top of these).
        report_interval_s: Seconds between metric reports to Ray Train (each report
            carries every iteration's row, so ``metrics.jsonl`` stays complete).
        eval_every: Iterations between held-out evaluations on the rollout actors (LM
            algorithms: greedy ``lm.eval_fn`` on ``lm.eval_prompts`` -> ``eval/accuracy``;
            gym: ``eval_episodes`` greedy episodes on held-out seeds ->
            ``eval/return_mean``; also after the last iteration); null: none.
        eval_episodes: Episodes per gym held-out evaluation, split over the env runners.
        best_metric: The metric that chooses ``checkpoint_best`` (higher is better). Null:
            with ``eval_every`` the algorithm's held-out metric (``eval/accuracy`` for LM
            policies, ``eval/return_mean`` for gym, ``eval/pairwise_accuracy`` for reward
            models), measured on every evaluation, which is then also checkpointed; never
            a learned reward. Without ``eval_every`` the training score (``reward/mean``,
            ``rollout/episode_return_mean``, ...) averaged over the last ``best_window``
            iterations, so one lucky batch does not choose it.
        best_window: Iterations the training score is averaged over (``best_metric`` not
            an ``eval/`` metric).
        stop_on_overoptimization: K: stop once the held-out true metric (the ``eval/``
            metric choosing ``checkpoint_best``, e.g. ``eval/accuracy``) or
            ``eval/reward_model_auc`` has fallen at each of the last K evaluations in a row
            (a policy gaming its reward model); ``summary.json`` records it under
            ``early_stop`` and ``checkpoint_best`` keeps the policy before the fall. Needs
            ``eval_every``; null: off. The count restarts on ``--resume``.
        async_rollouts: Overlap sampling with learning: the actors sample the next batch
            with the weights they hold while the learner updates on the last one (one
            policy version behind; ``rollout/policy_lag`` records it per batch). The
            PPO / GRPO ratio is taken against the log-probs the sampler recorded, which
            corrects for the lag. Off by default: on-policy is what the papers ran.
        max_policy_lag: With ``async_rollouts``: the most versions a batch may lag behind
            the learner. The loop runs one batch ahead, so batches lag by 1; an older one
            (from an actor Ray restarted with stale weights) is resampled.
    """

    algo: Algorithm = "ppo"
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lm_ppo: LMPPOConfig = field(default_factory=LMPPOConfig)
    rsft: RSFTConfig = field(default_factory=RSFTConfig)
    filtered_bc: FilteredBCConfig = field(default_factory=FilteredBCConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    orpo: ORPOConfig = field(default_factory=ORPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    ilql: ILQLConfig = field(default_factory=ILQLConfig)
    rllib: RLlibConfig = field(default_factory=RLlibConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    total_env_steps: int = 200_000
    total_iterations: int | None = None
    time_limit_s: float | None = None
    stop_return: float | None = None
    stop_success_rate: float | None = None
    seed: int = 0
    init_from: str | None = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    report_interval_s: float = 1.0
    eval_every: int | None = None
    eval_episodes: int = 10
    best_metric: str | None = None
    best_window: int = 10
    stop_on_overoptimization: int | None = None
    async_rollouts: bool = False
    max_policy_lag: int = 1

    def __post_init__(self) -> None:
        require(self.total_env_steps >= 1, "total_env_steps", "must be >= 1")
        require(
            self.total_iterations is None or self.total_iterations >= 1,
            "total_iterations",
            "must be >= 1 or null",
        )
        require(
            self.time_limit_s is None or self.time_limit_s > 0,
            "time_limit_s",
            "must be > 0 or null",
        )
        require(
            self.stop_success_rate is None or 0 < self.stop_success_rate <= 1,
            "stop_success_rate",
            "must be in (0, 1] or null",
        )
        require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        require(self.report_interval_s >= 0, "report_interval_s", "must be >= 0")
        require(
            self.eval_every is None or self.eval_every >= 1, "eval_every", "must be >= 1 or null"
        )
        require(self.eval_episodes >= 1, "eval_episodes", "must be >= 1")
        require(self.best_window >= 1, "best_window", "must be >= 1")
        require(
            self.stop_on_overoptimization is None or self.stop_on_overoptimization >= 1,
            "stop_on_overoptimization",
            f"must be >= 1 (evaluations in a row) or null (got {self.stop_on_overoptimization})",
        )
        require(
            self.stop_on_overoptimization is None or self.eval_every is not None,
            "stop_on_overoptimization",
            "watches the held-out evaluations: set eval_every too",
        )
        require(
            self.stop_on_overoptimization is None
            or self.best_metric is None
            or self.best_metric.startswith("eval/"),
            "stop_on_overoptimization",
            f"watches held-out eval/ metrics; best_metric={self.best_metric} is a training one",
        )
        require(
            self.best_metric is None or bool(self.best_metric.strip()),
            "best_metric",
            "must name a metric (e.g. eval/accuracy) or be null",
        )
        require(
            self.best_metric is None
            or not self.best_metric.startswith("eval/")
            or self.eval_every is not None,
            "best_metric",
            f"{self.best_metric} is measured only with eval_every set",
        )
        require(
            not self.async_rollouts or self.algo in ASYNC_ALGORITHMS,
            "async_rollouts",
            f"algo={self.algo} trains on its samples as if the current policy drew them, with "
            f"no importance ratio to correct a lag; async_rollouts is for {list(ASYNC_ALGORITHMS)}",
        )
        require(
            self.max_policy_lag >= 1,
            "max_policy_lag",
            "must be >= 1 (async_rollouts samples with the weights one update behind)",
        )
        require(
            self.resources.num_rollout_actors % self.resources.num_learners == 0,
            "resources.num_rollout_actors",
            f"must be a multiple of resources.num_learners ({self.resources.num_learners}) "
            "so every DDP rank samples the same amount",
        )

    @property
    def algo_config(self) -> Any:
        """The section of the selected algorithm (e.g. ``self.ppo``)."""
        return getattr(self, self.algo)
