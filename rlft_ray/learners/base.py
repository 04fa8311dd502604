"""The one interface the training loop talks to.

A learner owns the trainable modules and optimizer on one Ray Train rank and
knows three things the loop does not: which rollout actor feeds it
(:meth:`Learner.sampler` / :meth:`Learner.sampler_kwargs`), how to turn a batch into an
update (:meth:`Learner.update`), and which weights the actors need
(:meth:`Learner.policy_state`). Nothing here imports Ray, so unit tests can
drive a learner directly.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlft_ray.config import RunConfig
from rlft_ray.config.algorithms import algorithm_spec
from rlft_ray.core.torch_utils import fused_optimizer
from rlft_ray.learners.ddp import LearnerContext, NonFiniteLossError, check_finite, wrap_ddp
from rlft_ray.learners.nets import space_signature

__all__ = [
    "EvalOptions",
    "Learner",
    "LearnerContext",
    "NonFiniteLossError",
    "Spaces",
    "TaskProbe",
    "to_tensor",
]


@dataclass(frozen=True)
class Spaces:
    """Observation and action space of the task, read once by the driver."""

    observation: gym.Space
    action: gym.Space

    def signature(self) -> dict[str, str]:
        """Comparable descriptions of both spaces (stored in checkpoints, checked on load)."""
        return {
            "observation": space_signature(self.observation),
            "action": space_signature(self.action),
        }


@dataclass
class TaskProbe:
    """What the driver learns about the task before starting Ray (see :meth:`Learner.probe`).

    Attributes:
        spaces: Observation/action spaces (checked against checkpoints).
        datasets: Named tables (pandas DataFrames) that become Ray Datasets, sharded
            over the learner ranks by Ray Train (``LearnerContext.datasets``).
        tables: Small tables (pandas) every rank receives whole (``LearnerContext.tables``),
            e.g. the held-out prompts.
        info: Decisions worth recording in ``summary.json`` (e.g. prompts dropped).
        cfg: The config as workers must see it (e.g. local paths made absolute, since
            Ray workers do not share the driver's working directory); None: unchanged.
    """

    spaces: Spaces
    datasets: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    cfg: RunConfig | None = None


@dataclass(frozen=True)
class EvalOptions:
    """``rlft-ray eval`` options; each learner reads the ones that apply to it.

    Attributes:
        episodes: Episodes to run (gym tasks).
        seed: Seed of the first episode (gym tasks).
        stochastic: Sample actions instead of the greedy/mean action (gym tasks).
        dataset: Prompt file to score greedy completions on (LM tasks).
        limit: Score at most this many prompts (LM tasks).
        samples: Also sample this many completions per prompt and report pass@k and maj@k
            (LM tasks; 0: greedy accuracy only).
    """

    episodes: int = 20
    seed: int = 12345
    stochastic: bool = False
    dataset: str | None = None
    limit: int | None = None
    samples: int = 0


#: Held-out evaluation episodes reset with seeds from ``seed + HELDOUT_SEED`` on.
HELDOUT_SEED = 1_000_000


class CurvePlot(NamedTuple):
    """A run's learning curve: ``y`` against ``x`` from ``metrics.jsonl``, into ``file``."""

    y: str
    x: str
    file: str


class Learner(ABC):
    """Algorithm-specific half of the loop (PPO, DQN, ...).

    Args:
        cfg: The run config (the learner reads ``cfg.algo_config``).
        spaces: Task spaces.
        ctx: Rank, world size and device.
    """

    #: Its actors score samples with the run's reward (``lm.reward_model`` then needs scorers).
    scores_samples: ClassVar[bool] = False
    #: The training score (higher is better): the progress bar's, and what ranks
    #: checkpoints without a held-out evaluation.
    score_metric: ClassVar[str] = "rollout/episode_return_mean"
    #: The held-out metric of :meth:`heldout_eval`: what ranks checkpoints with ``eval_every``.
    eval_metric: ClassVar[str] = "eval/return_mean"
    #: It brings its own training loop (``algo: rllib``: RLlib's ``Algorithm``), which the
    #: driver runs instead of the rollout actors and Ray Train loop.
    runs_itself: ClassVar[bool] = False
    #: The learning-curve PNG written into the run directory.
    curve: ClassVar[CurvePlot] = CurvePlot(
        y="rollout/episode_return_mean", x="counters/env_steps", file="return_curve.png"
    )

    @classmethod
    def best_metric(cls, cfg: RunConfig) -> str:
        """The metric that chooses ``checkpoint_best`` (see ``RunConfig.best_metric``)."""
        if cfg.best_metric is not None:
            return cfg.best_metric
        return cls.eval_metric if cfg.eval_every is not None else cls.score_metric

    def __init__(self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext) -> None:
        self.cfg = cfg
        self.spaces = spaces
        self.ctx = ctx
        self.optimizer: torch.optim.Optimizer

    def build_policy(
        self, spaces: Spaces, lr: float, eps: float = 1e-8
    ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
        """A gym learner's network (:meth:`make_policy`), its DDP wrapper and its Adam."""
        policy = self.make_policy(self.cfg, spaces)
        model = wrap_ddp(policy, self.ctx)
        optimizer = fused_optimizer(torch.optim.Adam, policy.parameters(), lr=lr, eps=eps)
        return policy, model, optimizer

    def gradient_step(self, loss: torch.Tensor, params: Any, max_grad_norm: float) -> torch.Tensor:
        """A gym learner's optimizer step on ``loss``: backward, clip to ``max_grad_norm``
        (refusing a non-finite norm), step. Returns the norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
        check_finite("loss/grad_norm", grad_norm)
        self.optimizer.step()
        return grad_norm

    # -- before Ray -----------------------------------------------------------------------
    @classmethod
    def probe(cls, cfg: RunConfig) -> TaskProbe:
        """Check the task and read its spaces before any Ray work (gym: make the env once).

        Raises:
            ConfigError: A config value the task cannot use (names the key).
            ValueError: The environment cannot be made or the policy cannot act in it.
        """
        from rlft_ray.rollout.env_runner import probe_spaces

        spaces = Spaces(*probe_spaces(cfg.env))
        try:
            cls.make_policy(cfg, spaces)
        except ValueError as exc:
            raise ValueError(f"algo={cfg.algo} cannot act in env {cfg.env.id}: {exc}") from exc
        return TaskProbe(spaces)

    @classmethod
    def sampler(cls, cfg: RunConfig) -> type | None:
        """The plain rollout actor class this run starts (None: no actors), as the
        algorithm's spec names it (:mod:`rlft_ray.config.algorithms`)."""
        from rlft_ray.learners.registry import rollout_actor_cls

        return rollout_actor_cls(cfg)

    @property
    def offline(self) -> bool:
        """Learns from its own data shard (:meth:`next_batch`) instead of the actors' samples."""
        return algorithm_spec(self.cfg.algo).offline

    @classmethod
    def prepare_uses_actors(cls, cfg: RunConfig) -> bool:
        """Whether :meth:`prepare` holds ``resources.num_rollout_actors`` actors of its own
        (the driver checks they fit the cluster before calling it). Default: no."""
        return False

    @classmethod
    def prepare(cls, cfg: RunConfig, probe: TaskProbe, output_dir: Path) -> TaskProbe:
        """Data work that needs the cluster, after Ray starts and before the learners do
        (e.g. DPO's reference log-probs through a Ray Data actor pool). Default: none."""
        return probe

    @classmethod
    def evaluate(cls, checkpoint: Path, cfg: RunConfig, opts: EvalOptions) -> dict[str, Any]:
        """``rlft-ray eval``: run the checkpoint's policy for ``opts.episodes`` episodes."""
        from rlft_ray.learners.checkpoint import load_modules
        from rlft_ray.rollout.env_runner import probe_spaces

        policy = cls.make_policy(cfg, Spaces(*probe_spaces(cfg.env)))
        load_modules(checkpoint, {"policy": policy})
        policy.eval()
        return policy_eval_result(policy, checkpoint, cfg, opts)

    # -- what the actors need -------------------------------------------------------
    @classmethod
    @abstractmethod
    def make_policy(cls, cfg: RunConfig, spaces: Spaces) -> nn.Module:
        """The policy module the rollout actors act with (same class the learner trains)."""

    @classmethod
    def sampler_kwargs(cls, cfg: RunConfig, index: int) -> dict[str, Any]:
        """Constructor kwargs of rollout actor ``index`` (env runners by default)."""
        from functools import partial

        return {
            "env_cfg": cfg.env,
            "make_policy": partial(policy_from_spaces, cls, cfg),
            "rollout_steps": cfg.algo_config.rollout_steps,
            "seed": cfg.seed + 10_007 * (index + 1),
            "num_threads": max(1, int(cfg.resources.cpus_per_rollout_actor)),
        }

    @classmethod
    def resample_rounds(cls, cfg: RunConfig) -> int | None:
        """Dynamic sampling (DAPO): the loop drops groups of equal rewards and samples more
        prompts, at most this many extra rounds per iteration, until the batch is full
        again. None (the default): the batch is taken as sampled."""
        return None

    def next_sample_args(self, num_actors: int) -> list[tuple[Any, ...]]:
        """Positional arguments of each of this rank's actors' next ``sample`` call.

        Env runners take none; generation actors take their share of the next prompts.
        """
        return [() for _ in range(num_actors)]

    @abstractmethod
    def policy_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights the actors load after each update."""

    def next_batch(self, version: int) -> Any:
        """An offline learner's next batch from its data shard (``offline = True``)."""
        raise NotImplementedError(f"{type(self).__name__} samples from actors, not its data")

    def heldout_eval(self, runners: Any, version: int) -> dict[str, float]:
        """``eval/*`` metrics of a held-out evaluation (``eval_every``), on rank 0.

        By default the learner's :meth:`heldout_requests` are scored in parallel on every
        rollout actor (they hold the weights just published: Ray runs one caller's calls
        in order) and :meth:`heldout_metrics` turns the results into metrics.

        Args:
            runners: The :class:`~rlft_ray.rollout.group.RunnerGroup`.
            version: The policy version the actors should hold.
        """
        requests = self.heldout_requests(len(runners.all_runners))
        if not requests:
            return {}
        start = time.perf_counter()
        results = runners.evaluate(requests, version)
        if results is None:
            return {}
        metrics = self.heldout_metrics(results)
        metrics["perf/eval_s"] = time.perf_counter() - start
        return metrics

    def heldout_requests(self, num_actors: int) -> list[tuple[Any, ...]] | None:
        """Arguments of each actor's ``heldout_scores`` call for a held-out evaluation
        (``eval_every``), split over ``num_actors``; None: this learner has none.

        Gym default: ``eval_episodes`` greedy episodes split over the env runners, on
        seeds no training reset uses (``seed + 10**6`` on)."""
        total = self.cfg.eval_episodes
        base, extra = divmod(total, num_actors)
        counts = [base + (i < extra) for i in range(num_actors)]
        starts = np.cumsum([0, *counts[:-1]])
        return [(n, HELDOUT_SEED + self.cfg.seed + int(s)) for n, s in zip(counts, starts)]

    def heldout_metrics(self, results: list[Any]) -> dict[str, float]:
        """``eval/*`` metrics from the actors' ``heldout_scores`` results (gym default:
        ``eval/return_mean``, ``eval/return_std`` and, where reported, ``eval/success_rate``)."""
        returns = [r for stats in results for r in stats.returns]
        successes = [s for stats in results for s in stats.successes]
        out = {
            "eval/return_mean": float(np.mean(returns)) if returns else 0.0,
            "eval/return_std": float(np.std(returns)) if returns else 0.0,
        }
        if successes:
            out["eval/success_rate"] = float(np.mean(successes))
        return out

    # -- learning ---------------------------------------------------------------------
    @abstractmethod
    def update(self, batch: Any, progress: float) -> dict[str, float]:
        """One learning step on ``batch``; returns namespaced metrics (``loss/...``).

        Args:
            batch: This rank's batch (e.g. a :class:`~rlft_ray.types.RolloutBatch`).
            progress: Fraction of the run's budget done before this batch, in [0, 1].
        """

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints (``policy`` first).

        A Hugging Face ``PreTrainedModel`` is saved as a ``save_pretrained`` directory
        ``{name}/``, any other module as ``{name}.safetensors``.
        """

    def save_extras(self, path: Path) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Write files beside the modules into checkpoint directory ``path`` (e.g. the tokenizer)."""

    def rank_state(self) -> dict[str, np.ndarray]:
        """This rank's own training state beyond modules and optimizer (e.g. DQN's replay).

        Saved per rank in checkpoints (``rank_state/{rank}.npz``) and handed back to
        :meth:`load_rank_state` on ``--resume``, so a resumed run loses no data. Default: none.
        """
        return {}

    def load_rank_state(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`rank_state` returned."""

    def after_init_from(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Hook run after ``init_from`` loaded module weights (e.g. sync a target net)."""

    def load_start_point(self, path: Path) -> None:  # noqa: B027 (optional hook, no-op by default)
        """On a resume of an ``init_from`` run: restore what the run started from (e.g. the
        LM's KL reference) from ``path``, before the checkpoint restores the trained weights."""


def policy_from_spaces(
    cls: type[Learner], cfg: RunConfig, obs_space: gym.Space, act_space: gym.Space
) -> nn.Module:
    """``cls.make_policy`` from two spaces (what env runners call, via ``functools.partial``)."""
    return cls.make_policy(cfg, Spaces(obs_space, act_space))


def to_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy array -> tensor on ``device``.

    Arrays read from Ray's object store are read-only; copy those (torch warns on
    wrapping non-writable memory, and an in-place op would fault).
    """
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x, dtype=dtype, device=device)


def policy_eval_result(
    policy: Any, checkpoint: Path, cfg: RunConfig, opts: EvalOptions, **extra: Any
) -> dict[str, Any]:
    """``rlft-ray eval`` of a gym policy: ``opts.episodes`` episodes of ``policy`` on
    ``cfg.env`` summarised (return mean / std, length, success rate where reported), with
    ``extra`` fields after the env's."""
    import numpy as np

    from rlft_ray.rollout.env_runner import evaluate_policy

    stats = evaluate_policy(
        policy, cfg.env, opts.episodes, opts.seed, deterministic=not opts.stochastic
    )
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "env": cfg.env.id,
        **extra,
        "episodes": opts.episodes,
        "episode_return_mean": float(np.mean(stats.returns)),
        "episode_return_std": float(np.std(stats.returns)),
        "episode_len_mean": float(np.mean(stats.lengths)),
    }
    if stats.successes:
        result["success_rate"] = float(np.mean(stats.successes))
    return result
