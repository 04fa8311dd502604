"""Driving a set of rollout actors from a learner: sampling, weight sync, recovery."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.actor import ActorHandle

from rlft_ray.core.errors import DeterministicError
from rlft_ray.core.torch_utils import weights_to_wire
from rlft_ray.rollout.shared_weights import SharedWeights
from rlft_ray.types import UNSYNCED_VERSION

logger = logging.getLogger(__name__)

# What a dead actor's calls raise while Ray restarts it.
_ACTOR_DOWN = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class SamplingTimeoutError(DeterministicError, TimeoutError):
    """A rollout actor did not answer a sampling call in time, twice in a row (restarted
    in between): a hanging reward function or environment, not bad luck."""


class ActorLostError(DeterministicError, RuntimeError):
    """A rollout actor is gone for good (``resources.max_actor_restarts`` used up): a
    learner restart would reuse the same dead actor."""


class _TimedOut(Exception):
    """One sampling call ran past the timeout; the actor was killed (Ray restarts it)."""


def make_remote_runners(
    sampler_cls: type,
    count: int,
    num_cpus: float,
    max_restarts: int,
    name_prefix: str,
    kwargs_for: Callable[[int], dict[str, Any]],
    resources: Mapping[str, float] | None = None,
    num_gpus: float = 0.0,
) -> list[ActorHandle]:
    """Start ``count`` actors of the plain class ``sampler_cls`` (thin ``ray.remote`` wrapper).

    Args:
        sampler_cls: e.g. :class:`~rlft_ray.rollout.env_runner.EnvRunner`.
        count: Number of actors.
        num_cpus: CPUs each actor holds (fractional is fine).
        max_restarts: Ray restarts a dead actor this many times (re-running ``__init__``).
        name_prefix: Actors are named ``{name_prefix}{i}`` so tools and tests can find them.
        kwargs_for: Constructor kwargs for actor i.
        resources: Custom Ray resources each actor requires (pins actors to nodes).
        num_gpus: GPUs each actor holds (generation actors on GPU nodes).
    """
    remote_cls = ray.remote(sampler_cls)
    return [
        remote_cls.options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            resources=dict(resources or {}),
            max_restarts=max_restarts,
            max_task_retries=0,
            name=f"{name_prefix}{i}",
        ).remote(**kwargs_for(i))
        for i in range(count)
    ]


@dataclass
class PendingSample:
    """``sample`` calls in flight on a rank's actors (:meth:`RunnerGroup.submit`)."""

    calls: list[Any]
    args: list[tuple[Any, ...]]


class RunnerGroup:
    """The rollout actors one learner rank samples from.

    Args:
        all_runners: Every rollout actor of the run (rank 0 publishes weights to all).
        mine: Indices of the actors this rank samples from.
        recovery_timeout_s: How long to wait for Ray to restart a dead actor.
        sample_timeout_s: Longest wait for one call (sampling, weight loading); an actor
            past it is killed and restarted, and a second timeout fails the run.
        shared: Publish through this shared-memory file instead of the object store
            (actors on this machine only: a local instance). Safe with one sampling call in
            flight per actor, as the loop has: a slot is rewritten only after a batch
            sampled after its last reader has been collected.
    """

    def __init__(
        self,
        all_runners: Sequence[ActorHandle],
        mine: Sequence[int],
        recovery_timeout_s: float = 60.0,
        sample_timeout_s: float = 600.0,
        shared: SharedWeights | None = None,
    ) -> None:
        self.all_runners = list(all_runners)
        self.shared = shared
        self.mine = list(mine)
        self.recovery_timeout_s = recovery_timeout_s
        self.sample_timeout_s = sample_timeout_s
        self.restarts = 0
        self._loads: list[Any] = []  # ``set_weights_timed`` calls not yet read back

    def publish(self, weights: dict[str, torch.Tensor], version: int, wait: bool = True) -> float:
        """Put the weights in the object store once (or in the ``shared`` file); every actor
        loads them. Returns the seconds of the write (or the put); the actors' own load
        seconds come from :meth:`load_seconds`.

        Tensors travel as numpy arrays (shared memory, no per-tensor unpickling); the
        actors' ``set_weights`` accept either, or a shared slot.

        Args:
            weights: The policy's state dict.
            version: The policy version the actors hold afterwards.
            wait: Block until every actor has loaded them. Needed when other learner
                ranks sample next (their calls are not ordered after ours). With one rank
                the learner's own ``sample`` calls queue behind ``set_weights`` (Ray runs
                one caller's calls to an actor in order), so it need not wait; a failed
                load then shows up as a version mismatch at the next sample.
        """
        start = time.perf_counter()
        if not self.all_runners:  # a learner without actors (a reward model)
            return 0.0
        # a shared slot is a few hundred bytes (inlined in the calls); else one object
        ref = self.shared.write(weights, version) if self.shared is not None else None
        ref = ref if ref is not None else ray.put(weights_to_wire(weights))
        written_s = time.perf_counter() - start
        pending = {
            i: r.set_weights_timed.remote(ref, version) for i, r in enumerate(self.all_runners)
        }
        self._loads.extend(pending.values())
        if wait:
            for i, call in pending.items():
                try:
                    self._get(i, call)
                except (*_ACTOR_DOWN, _TimedOut):
                    # Its rank restores it (with its own copy of the weights) on the next sample.
                    logger.warning("rollout actor %d was down during weight sync", i)
        return written_s

    def load_seconds(self) -> float:
        """Seconds the actors spent loading published weights, over the loads that finished
        since the last call: per version the slowest actor's (they load in parallel), summed
        over versions. With one learner :meth:`publish` does not wait for the loads (the
        actors run them before their next ``sample``), so a load is read here an iteration
        later; the learner's ``perf/weight_sync_s`` is the publish plus this. A load that
        failed (a dead actor, restored by :meth:`collect`) counts nothing."""
        if not self._loads:
            return 0.0
        done, self._loads = ray.wait(self._loads, num_returns=len(self._loads), timeout=0)
        slowest: dict[int, float] = {}  # per version held
        for call in done:
            try:
                version, seconds = ray.get(call, timeout=0)
            except ray.exceptions.RayError:  # a failed load (restored elsewhere): no figure
                continue
            slowest[version] = max(slowest.get(version, 0.0), seconds)
        return sum(slowest.values(), 0.0)

    def sample(
        self,
        weights_for_recovery: Callable[[], tuple[dict[str, torch.Tensor], int]],
        *args: Any,
        per_actor: Sequence[tuple[Any, ...]] | None = None,
        version: int | None = None,
    ) -> list[Any]:
        """Sample once from each of this rank's actors, restoring any that died.

        Args:
            weights_for_recovery: Returns ``(weights, version)`` for a restarted actor.
            *args: Forwarded to every actor's ``sample``.
            per_actor: Arguments for each of this rank's actors, in order (e.g. each
                generation actor's share of the prompts); appended after ``args``.
            version: The policy version every actor should hold; a batch sampled with
                another one comes from an actor Ray restarted in between, which is
                then restored and resampled.

        Returns:
            One batch per actor, in order.
        """
        return self.collect(self.submit(*args, per_actor=per_actor), weights_for_recovery, version)

    def submit(
        self, *args: Any, per_actor: Sequence[tuple[Any, ...]] | None = None
    ) -> PendingSample:
        """Start one ``sample`` call on each of this rank's actors and return at once;
        :meth:`collect` waits for them (overlapped sampling: the learner updates between)."""
        actor_args = [args + tuple(extra) for extra in (per_actor or [()] * len(self.mine))]
        calls = [self.all_runners[i].sample.remote(*a) for i, a in zip(self.mine, actor_args)]
        return PendingSample(calls, actor_args)

    def collect(
        self,
        pending: PendingSample,
        weights_for_recovery: Callable[[], tuple[dict[str, torch.Tensor], int]],
        version: int | None = None,
        max_lag: int = 0,
    ) -> list[Any]:
        """The batches of :meth:`submit`'s calls, restoring actors that died; a batch
        sampled with a version outside ``[version - max_lag, version]`` comes from an
        actor Ray restarted in between: it is restored and resampled."""
        out = []
        for i, call, a in zip(self.mine, pending.calls, pending.args):
            try:
                batch = self._get(i, call)
            except (*_ACTOR_DOWN, _TimedOut) as exc:
                batch = self._recover(i, exc, weights_for_recovery, a)
            else:
                lag = None if version is None else version - batch.policy_version
                unsynced = batch.policy_version == UNSYNCED_VERSION  # never got weights
                if lag is not None and (unsynced or not 0 <= lag <= max_lag):
                    batch = self._recover(i, None, weights_for_recovery, a)
            out.append(batch)
        return out

    def evaluate(
        self, requests: Sequence[tuple[Any, ...]], version: int, timeout_s: float | None = None
    ) -> list[Any] | None:
        """``heldout_scores(*requests[i])`` on actor i of all actors, in parallel.

        Returns:
            Each actor's scores, or None (with a warning) when an actor is down, does not
            answer within ``timeout_s``, or answers with weights other than ``version``
            (Ray restarted it): a held-out figure from stale weights would mislead.
        """
        calls = [r.heldout_scores.remote(*a) for r, a in zip(self.all_runners, requests)]
        _, hung = ray.wait(
            calls, num_returns=len(calls), timeout=timeout_s or self.sample_timeout_s
        )
        if hung:  # restart them now, or the next sampling call waits a whole timeout again
            for i in [calls.index(c) for c in hung]:
                ray.kill(self.all_runners[i], no_restart=False)
            logger.warning("held-out evaluation skipped: %d actor(s) timed out", len(hung))
            return None
        try:
            answers = ray.get(calls)
        except _ACTOR_DOWN as exc:
            logger.warning("held-out evaluation skipped: %s", type(exc).__name__)
            return None
        if any(v != version for v, _ in answers):
            logger.warning("held-out evaluation skipped: an actor was restarted with old weights")
            return None
        return [scores for _, scores in answers]

    def _get(self, i: int, call: Any) -> Any:
        """``ray.get`` bounded by ``sample_timeout_s``; past it, actor ``i`` is killed so
        that Ray restarts it (a hanging call cannot be cancelled otherwise)."""
        try:
            return ray.get(call, timeout=self.sample_timeout_s)
        except ray.exceptions.GetTimeoutError:
            logger.warning(
                "rollout actor %d did not answer within %.0f s (resources.sample_timeout_s); "
                "restarting it",
                i,
                self.sample_timeout_s,
            )
            ray.kill(self.all_runners[i], no_restart=False)
            raise _TimedOut(i) from None

    def _recover(
        self, i: int, exc: Exception | None, weights_for_recovery: Callable, args: tuple
    ) -> Any:
        cause = type(exc).__name__ if exc is not None else "restarted with stale weights"
        if not isinstance(exc, _TimedOut):
            logger.warning("rollout actor %d died (%s); restoring it", i, cause)
        deadline = time.monotonic() + self.recovery_timeout_s
        runner = self.all_runners[i]
        while True:
            try:
                weights, version = weights_for_recovery()
                self._get(i, runner.set_weights.remote(weights, version))
                batch = self._get(i, runner.sample.remote(*args))
                self.restarts += 1
                return batch
            except _TimedOut:
                if isinstance(exc, _TimedOut):
                    raise SamplingTimeoutError(
                        f"rollout actor {i} did not answer a sampling call within "
                        f"{self.sample_timeout_s:g} s twice in a row, restarted in between: "
                        "a reward function or environment that hangs? (raise "
                        "resources.sample_timeout_s if sampling is just slow)"
                    ) from None
                exc = _TimedOut(i)
            except _ACTOR_DOWN as again:
                if time.monotonic() > deadline:
                    raise ActorLostError(
                        f"rollout actor {i} did not come back within {self.recovery_timeout_s:.0f}s "
                        "(resources.max_actor_restarts exhausted?)"
                    ) from again
                time.sleep(0.2)
