"""How long a rollout actor took to load published weights (``perf/weight_load_s``)."""

from __future__ import annotations

import time
from typing import Any


class TimedWeightLoads:
    """A mixin of the rollout actors: ``set_weights`` with its own seconds, for the learner's
    ``perf/weight_sync_s`` (publish + load). With one learner the loop does not wait for the
    loads; :class:`~rlft_ray.rollout.group.RunnerGroup` collects their seconds once they are
    done."""

    def set_weights_timed(self, weights: Any, version: int) -> tuple[int, float]:
        """:meth:`set_weights`, returning ``(version now held, seconds it took)``."""
        start = time.perf_counter()
        held = self.set_weights(weights, version)  # type: ignore[attr-defined]
        return held, time.perf_counter() - start
