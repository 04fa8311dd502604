"""The training loop every Ray Train worker runs (one per learner rank).

sample (this rank's rollout actors) -> learner.update -> rank 0 publishes weights
-> report metrics (+ checkpoint). Algorithm differences live in the
:class:`~rlft_ray.learners.base.Learner` the registry returns for ``cfg.algo``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import get_device

from rlft_ray.config import RunConfig
from rlft_ray.core.torch_utils import (
    peak_rss_mb,
    release_free_memory,
    seed_everything,
    torch_threads,
)
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import Learner, LearnerContext, Spaces
from rlft_ray.learners.ddp import global_sum, rank0_decides
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.lm.prompts import TableShard
from rlft_ray.rollout.dynamic_sampling import fill_batch
from rlft_ray.rollout.group import PendingSample, RunnerGroup
from rlft_ray.run.early_stop import fallen_metric, watched_metrics
from rlft_ray.run.metrics import ROWS_KEY
from rlft_ray.run.restore import restore

logger = logging.getLogger(__name__)

#: The key of ``train_loop_config`` whose value references the loop's inputs.
LOOP_CFG = "loop_cfg"
#: Bound on fetching them from the object store (another node's, on a cluster).
LOOP_CFG_TIMEOUT_S = 300.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config[LOOP_CFG]`` references a dict of ``cfg``, ``spaces``,
    ``runners`` (actor handles), ``datasets`` (names of the Ray Datasets Ray Train shards),
    ``inline_datasets`` and ``tables`` (small tables every rank gets whole), ``resume_from``
    and ``start_checkpoint`` (see :func:`restore`); the dict itself in local mode, with
    ``shared_weights`` (publish through shared memory) and ``report_to``."""
    loop_cfg = _loop_inputs(config[LOOP_CFG])
    cfg: RunConfig = loop_cfg["cfg"]
    spaces: Spaces = loop_cfg["spaces"]
    _quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    res = cfg.resources
    torch.set_num_threads(res.threads_per_learner or torch_threads(res.cpus_per_learner))
    seed_everything(cfg.seed + 7919 * rank)

    ctx = _learner_context(loop_cfg, rank, world)
    learner = get_learner_cls(cfg.algo)(cfg, spaces, ctx)
    runners = _rank_runners(loop_cfg, cfg, rank, world)
    counters = restore(
        learner, cfg, spaces, loop_cfg.get("resume_from"), loop_cfg.get("start_checkpoint")
    )
    if rank == 0:
        runners.publish(learner.policy_state(), counters.policy_version)
        runners.load_seconds()  # the first load is start-up, not an iteration's sync
    _barrier(world)
    clock_start = time.perf_counter() - counters.wall_s
    reporter = _Reporter(cfg, spaces, ctx, loop_cfg.get("report_to", ()))
    watch = _OveroptimizationWatch(cfg, type(learner).best_metric(cfg))

    last = _finished(cfg, counters, counters.wall_s, ctx)
    overlap = cfg.async_rollouts and not learner.offline
    resample = None if learner.offline else type(learner).resample_rounds(cfg)
    pending = _submit(learner, runners) if overlap and not last else None
    while not last:
        t0 = time.perf_counter()
        if learner.offline:
            batch = learner.next_batch(counters.policy_version)
        elif overlap:  # this batch was sampled during the last update
            batch = _collect(learner, runners, pending, counters.policy_version, cfg.max_policy_lag)
        else:
            batch = _sample(learner, runners, counters.policy_version)
        if resample is not None:  # DAPO: drop flat groups, sample more prompts
            batch = _fill(learner, runners, batch, counters.policy_version, resample)
        t1 = time.perf_counter()

        returns, successes = _gather_episodes(batch.episodes, world)
        totals = _global_counts(batch.counts(), ctx)  # ranks may hold different amounts
        if overlap and not _budget_spent(cfg, counters, totals):
            pending = _submit(learner, runners)  # sampled while the update below runs
        metrics = learner.update(batch, progress=_progress(cfg, counters))
        release_free_memory()  # the update's activations: back to the system while it samples
        counters.iteration += 1
        counters.env_steps += int(totals["env_steps"])
        counters.policy_version += 1
        counters.record_episodes(returns, successes)
        t2 = time.perf_counter()

        last = _finished(cfg, counters, time.perf_counter() - clock_start, ctx)
        eval_due = _eval_due(cfg, counters, last)
        state, sync_s = _sync_weights(learner, runners, counters.policy_version, ctx, eval_due)
        if rank == 0 and eval_due:
            metrics.update(learner.heldout_eval(runners, counters.policy_version))
        if eval_due and not last and watch.active:
            last = watch.stop(metrics, ctx)
        _barrier(world)
        counters.wall_s = time.perf_counter() - clock_start

        metrics.update(_rollout_metrics(counters, returns, batch, world))
        # rates over the sampling time; an offline learner's over its whole iteration
        # (overlapped: over the whole iteration, the time a batch takes to come in)
        rate_s = (time.perf_counter() - t0) if learner.offline or overlap else (t1 - t0)
        metrics.update({f"perf/{k}_per_s": v / max(rate_s, 1e-9) for k, v in totals.items()})
        metrics.update(_timing_metrics((t0, t1, t2), sync_s, state, runners.restarts))
        reporter.add(metrics, learner, counters, last=last, evaluated=eval_due)


class _OveroptimizationWatch:
    """``stop_on_overoptimization``: rank 0 keeps the held-out evaluations and decides for
    every rank (:func:`~rlft_ray.run.early_stop.fallen_metric`)."""

    def __init__(self, cfg: RunConfig, best_metric: str) -> None:
        self.falls = cfg.stop_on_overoptimization
        self.active = self.falls is not None
        self.metrics = watched_metrics(best_metric)
        self.evaluations: list[dict[str, float]] = []

    def stop(self, metrics: dict[str, float], ctx: LearnerContext) -> bool:
        """Whether to stop after this evaluation; marks the row ``stop/overoptimization``."""
        fallen = None
        if ctx.rank == 0:
            self.evaluations.append({k: metrics[k] for k in self.metrics if k in metrics})
            fallen = fallen_metric(self.evaluations, self.falls, self.metrics)
        stop = rank0_decides(fallen is not None, ctx)
        if stop:
            metrics["stop/overoptimization"] = 1.0
        if fallen is not None:
            logger.warning(
                "stop_on_overoptimization: %s fell %d evaluations in a row; stopping",
                fallen,
                self.falls,
            )
        return stop


def _sync_weights(
    learner: Learner, runners: RunnerGroup, version: int, ctx: LearnerContext, eval_due: bool
) -> tuple[dict[str, Any], tuple[float, float]]:
    """Rank 0 publishes ``version``: actors that sample need every version, an offline
    learner's actors only score held-out sets. Returns the published state (with LoRA the
    adapters only; empty when nothing was published) and the seconds of the publish and of
    the actors' loads that are done by now (:meth:`RunnerGroup.load_seconds`)."""
    if ctx.rank != 0 or (learner.offline and not eval_due):
        return {}, (0.0, 0.0)
    state = learner.policy_state()
    publish_s = runners.publish(state, version, wait=ctx.world_size > 1)
    return state, (publish_s, runners.load_seconds())


def _timing_metrics(
    marks: tuple[float, float, float],
    sync_s: tuple[float, float],
    state: dict[str, Any],
    restarts: int,
) -> dict[str, float]:
    """Where an iteration's seconds went: sampling (``t0`` -> ``t1``), the update (-> ``t2``),
    the weight sync (and its bytes), the whole iteration; and actor restarts so far.

    ``sync_s`` is (the learner's publish, the actors' loads read back this iteration; see
    :meth:`~rlft_ray.rollout.group.RunnerGroup.load_seconds`); ``perf/weight_sync_s`` is
    their sum. With one learner an actor loads before its next ``sample`` call, so on a
    synchronous run its load also lies inside the next iteration's ``perf/sample_s``."""
    t0, t1, t2 = marks
    iteration_s = time.perf_counter() - t0
    publish_s, load_s = sync_s
    return {
        "perf/sample_s": t1 - t0,
        "perf/update_s": t2 - t1,
        "perf/weight_publish_s": publish_s,
        "perf/weight_load_s": load_s,
        "perf/weight_sync_s": publish_s + load_s,
        "perf/weight_sync_mb": sum(v.numel() * v.element_size() for v in state.values()) / 1e6,
        "perf/iteration_s": iteration_s,
        "perf/weight_sync_frac": (publish_s + load_s) / max(iteration_s, 1e-9),
        "perf/actor_restarts": float(restarts),
    }


def _loop_inputs(inputs: Any) -> dict[str, Any]:
    """The dict itself in Ray Train's local mode (the learner in the driver), with
    ``report_to``: the callbacks the loop calls after each report, since no controller
    does. Else fetched by its reference (bounded wait)."""
    return inputs if isinstance(inputs, dict) else ray.get(inputs, timeout=LOOP_CFG_TIMEOUT_S)


def _learner_context(loop_cfg: dict[str, Any], rank: int, world: int) -> LearnerContext:
    """This rank's context: its device, its shards of the datasets, the whole tables."""
    shards = {name: ray.train.get_dataset_shard(name) for name in loop_cfg.get("datasets", ())}
    for name, table in loop_cfg.get("inline_datasets", {}).items():
        shards[name] = TableShard(table, rank, world)
    return LearnerContext(rank, world, get_device(), shards, loop_cfg.get("tables", {}))


def _rank_runners(loop_cfg: dict[str, Any], cfg: RunConfig, rank: int, world: int) -> RunnerGroup:
    """This rank's share of the rollout actors (rank 0 also publishes to the others, through
    ``shared_weights``, a shared-memory file, when the learner runs in the driver)."""
    all_runners = loop_cfg["runners"]
    per_rank = len(all_runners) // world
    return RunnerGroup(
        all_runners,
        mine=range(rank * per_rank, (rank + 1) * per_rank),
        sample_timeout_s=cfg.resources.sample_timeout_s,
        shared=loop_cfg.get("shared_weights"),
    )


def _global_counts(counts: dict[str, float], ctx: LearnerContext) -> dict[str, float]:
    """What the batches of all ranks held together (``batch.counts()`` summed over ranks)."""
    names = sorted(counts)
    totals = torch.tensor([counts[k] for k in names], dtype=torch.float64, device=ctx.device)
    return dict(zip(names, global_sum(totals, ctx).tolist()))


def _eval_due(cfg: RunConfig, counters: ckpt.Counters, last: bool) -> bool:
    """Held-out evaluation every ``eval_every`` iterations and after the last one."""
    return cfg.eval_every is not None and (last or counters.iteration % cfg.eval_every == 0)


def _sample(learner: Learner, runners: RunnerGroup, version: int) -> Any:
    """One batch from this rank's rollout actors (restored if Ray restarted one)."""
    batches = runners.sample(
        lambda: (learner.policy_state(), version),
        per_actor=learner.next_sample_args(len(runners.mine)),
        version=version,
    )
    return type(batches[0]).concat(batches)


def _fill(learner: Learner, runners: RunnerGroup, batch: Any, version: int, rounds: int) -> Any:
    """Dynamic sampling: the batch's informative groups, topped up by up to ``rounds``
    synchronous rounds with the current weights (``version``: published before this call,
    so the actors' calls queue behind it), before the next overlapped batch is submitted."""
    return fill_batch(batch, lambda: _sample(learner, runners, version), max_rounds=rounds)


def _budget_spent(cfg: RunConfig, counters: ckpt.Counters, totals: dict[str, float]) -> bool:
    """Whether the iteration or env-step budget ends the run after this iteration (then no
    next batch is worth sampling)."""
    after = dataclasses.replace(
        counters,
        iteration=counters.iteration + 1,
        env_steps=counters.env_steps + int(totals.get("env_steps", 0)),
    )
    return _progress(cfg, after) >= 1.0


def _submit(learner: Learner, runners: RunnerGroup) -> PendingSample:
    """Start sampling the next batch with the weights the actors hold (overlapped
    sampling): the learner's next weights queue behind it on each actor."""
    return runners.submit(per_actor=learner.next_sample_args(len(runners.mine)))


def _collect(
    learner: Learner, runners: RunnerGroup, pending: PendingSample, version: int, max_lag: int
) -> Any:
    """The overlapped batch, sampled with a version at most ``max_lag`` behind ``version``
    (the PPO / GRPO ratio corrects against the log-probs its sampler recorded)."""
    batches = runners.collect(
        pending, lambda: (learner.policy_state(), version), version=version, max_lag=max_lag
    )
    return type(batches[0]).concat(batches)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO from a logger named after its file; mute it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # private module moved: only the log volume changes
        pass


def _gather_rank_states(learner: Learner, world: int) -> list[dict[str, Any]]:
    """Every rank's ``rank_state`` on rank 0 (an empty list elsewhere)."""
    state = learner.rank_state()
    if world == 1:
        return [state]
    states: list[Any] = [None] * world if learner.ctx.rank == 0 else []
    dist.gather_object(state, states if learner.ctx.rank == 0 else None, dst=0)
    return states


class _Reporter:
    """Batches per-iteration rows into few ``ray.train.report`` calls.

    Ray Train V2 hands each report to the controller through a one-slot queue that
    the controller drains once per poll, so reporting every iteration would throttle
    a fast loop to the poll rate. Rows are sent together under ``ROWS_KEY`` (the run
    directory callback writes each one to ``metrics.jsonl``); the flat metrics of the
    latest iteration ride along for Tune and the checkpoint ranking.
    """

    def __init__(
        self, cfg: RunConfig, spaces: Spaces, ctx: LearnerContext, report_to: Sequence[Any] = ()
    ) -> None:
        self.cfg, self.spaces, self.ctx, self.report_to = cfg, spaces, ctx, report_to
        self.rows: list[dict[str, float]] = []
        self.last_report = time.monotonic()

    def add(
        self,
        metrics: dict[str, float],
        learner: Learner,
        counters: ckpt.Counters,
        last: bool,
        evaluated: bool = False,
    ) -> None:
        self.rows.append(metrics)
        checkpoint_due = last or counters.iteration % self.cfg.checkpoint_every == 0
        # a held-out evaluation that ranks checkpoints gets one: checkpoint_best is the
        # evaluated policy itself
        checkpoint_due |= evaluated and type(learner).best_metric(self.cfg).startswith("eval/")
        # every rank must call report equally often: rank 0's clock decides
        due = checkpoint_due or time.monotonic() - self.last_report >= self.cfg.report_interval_s
        if not rank0_decides(due, self.ctx):
            return
        payload = {**metrics, ROWS_KEY: self.rows}
        self.rows, self.last_report = [], time.monotonic()
        rank_states = _gather_rank_states(learner, self.ctx.world_size) if checkpoint_due else []
        if not (checkpoint_due and self.ctx.rank == 0):
            self._report(payload)
            return

        def extras(path: Path) -> None:
            learner.save_extras(path)
            ckpt.save_rank_states(path, rank_states)

        with tempfile.TemporaryDirectory(prefix="rlft_ckpt_") as tmp:
            ckpt.save_checkpoint(
                Path(tmp),
                learner.modules(),
                learner.optimizer,
                counters,
                self.cfg,
                self.spaces.signature(),
                extras=extras,
            )
            self._report(payload, ray.train.Checkpoint.from_directory(tmp))

    def _report(
        self, payload: dict[str, Any], checkpoint: ray.train.Checkpoint | None = None
    ) -> None:
        ray.train.report(payload, checkpoint=checkpoint)
        for callback in self.report_to:  # local mode: the callbacks a controller would call
            callback.after_report(None, [payload], checkpoint)


def _progress(cfg: RunConfig, counters: ckpt.Counters) -> float:
    """Fraction of the budget used: env steps, or iterations when ``total_iterations`` is set."""
    done = counters.env_steps / cfg.total_env_steps
    if cfg.total_iterations is not None:
        done = max(done, counters.iteration / cfg.total_iterations)
    return min(done, 1.0)


def _finished(
    cfg: RunConfig,
    counters: ckpt.Counters,
    wall_s: float = 0.0,
    ctx: LearnerContext | None = None,
) -> bool:
    """The budget is spent, an early stop is reached, or ``time_limit_s`` has passed.

    Everything but the clock is the same on every rank; for the clock, rank 0 decides
    (ranks that stopped apart would hang in the next collective).
    """
    if _progress(cfg, counters) >= 1.0:
        return True
    # Early stops need a full window of the last 20 episodes.
    window = ckpt.RECENT_EPISODES
    return_reached = (
        cfg.stop_return is not None
        and len(counters.recent_returns) >= window
        and counters.return_mean() >= cfg.stop_return
    )
    success_reached = (
        cfg.stop_success_rate is not None
        and len(counters.recent_successes) >= window
        and sum(counters.recent_successes) / window >= cfg.stop_success_rate
    )
    if return_reached or success_reached:
        return True
    if cfg.time_limit_s is None:
        return False
    return rank0_decides(wall_s >= cfg.time_limit_s, ctx or LearnerContext())


def _rollout_metrics(
    counters: ckpt.Counters, returns: list[float], batch: Any, world: int
) -> dict[str, float]:
    out = {
        "counters/iteration": float(counters.iteration),
        "counters/env_steps": float(counters.env_steps),
        "counters/policy_version": float(counters.policy_version),
        "counters/episodes": float(counters.episodes),
        "rollout/episodes_this_iter": float(len(returns)),
        "rollout/policy_lag": float(counters.policy_version - 1 - batch.policy_version),
        "time/wall_s": counters.wall_s,
        "time/unix": time.time(),  # wall clock: start-up breakdown, time-to-accuracy curves
    }
    # memory per process: this learner rank, and each rollout actor that sampled the batch
    out["perf/peak_rss_mb/learner"] = peak_rss_mb()
    for i, mb in enumerate(getattr(batch, "peak_rss_mb", ())):
        out[f"perf/peak_rss_mb/actor{i}"] = mb
    if counters.recent_returns:
        out["rollout/episode_return_mean"] = float(counters.return_mean())
    if counters.recent_successes:
        out["rollout/success_rate"] = sum(counters.recent_successes) / len(
            counters.recent_successes
        )
    return out


def _gather_episodes(episodes: Any, world: int) -> tuple[list[float], list[bool]]:
    """Every rank gets all ranks' finished episodes (so all ranks stop together)."""
    local = (list(episodes.returns), list(episodes.successes))
    if world == 1:
        return local
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return [r for g in gathered for r in g[0]], [s for g in gathered for s in g[1]]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
