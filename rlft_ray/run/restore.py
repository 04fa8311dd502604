"""Where a training run starts from: the run directory's own checkpoint (a resume), a
checkpoint handed over by Tune (PBT exploits, trial restarts), ``init_from`` (another run's
weights, or an RLlib RLModule's), or nothing."""

from __future__ import annotations

from pathlib import Path

import ray.train

from rlft_ray.config import RunConfig
from rlft_ray.core.torch_utils import seed_everything
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import Learner, Spaces
from rlft_ray.learners.rllib_ckpt import is_rllib_checkpoint, load_rllib_into


def restore(
    learner: Learner,
    cfg: RunConfig,
    spaces: Spaces,
    resume_from: ray.train.Checkpoint | None = None,
    start_checkpoint: ray.train.Checkpoint | None = None,
) -> ckpt.Counters:
    """Continue ``resume_from`` (the run directory's ``checkpoint_last``: weights,
    optimizer, RNG, counters), else ``start_checkpoint`` (counters, optimizer moments;
    hyperparameters from ``cfg``), else start from ``init_from``, else fresh."""
    sig = spaces.signature()
    if cfg.init_from and (resume_from is not None or start_checkpoint is not None):
        learner.load_start_point(Path(cfg.init_from))  # e.g. the KL reference, not lm.model
    if resume_from is not None:
        with resume_from.as_directory() as path:
            ckpt.check_compatible(path, cfg, sig)
            ckpt.load_modules(path, learner.modules())
            return _load_rank_parts(
                learner, path, ckpt.load_training_state(path, learner.optimizer)
            )
    if start_checkpoint is not None:
        # Ray Train V2 dropped `resume_from_checkpoint`; its replacement is a checkpoint
        # passed in the loop config. Used by Tune trials (PBT exploit, trial restarts).
        with start_checkpoint.as_directory() as path:
            ckpt.check_compatible(path, cfg, sig)
            ckpt.load_modules(path, learner.modules())
            # The checkpoint brings the optimizer's state; this run's config its
            # hyperparameters (PBT mutates e.g. lr between the two).
            groups = [
                {k: v for k, v in g.items() if k != "params"}
                for g in learner.optimizer.param_groups
            ]
            counters = ckpt.load_training_state(path, learner.optimizer)
            for group, fresh in zip(learner.optimizer.param_groups, groups):
                group.update(fresh)
            return _load_rank_parts(learner, path, counters)
    if cfg.init_from and is_rllib_checkpoint(cfg.init_from):  # an RLlib RLModule's weights
        load_rllib_into(learner.modules()["policy"], cfg.init_from)
        learner.after_init_from()
        return ckpt.Counters()
    if cfg.init_from:
        ckpt.check_compatible(cfg.init_from, cfg, sig, same_algo=False)
        # the weights to start from; the reference is this run's own (after_init_from)
        seeds = [name for name in learner.modules() if name != "reference"]
        if "policy" not in ckpt.load_modules(cfg.init_from, learner.modules(), names=seeds):
            raise ckpt.CheckpointError(f"init_from {cfg.init_from}: no policy was loaded from it")
        learner.after_init_from()
    return ckpt.Counters()


def _load_rank_parts(learner: Learner, path: str, counters: ckpt.Counters) -> ckpt.Counters:
    """Per-rank parts of a resume: the learner's rank state, and distinct RNG streams
    (``rng.json`` is rank 0's, so other ranks reseed from the seed, rank and iteration)."""
    rank, world = learner.ctx.rank, learner.ctx.world_size
    state = ckpt.load_rank_state(path, rank, world)
    if state is not None:
        learner.load_rank_state(state)
    if rank > 0:
        seed_everything(learner.cfg.seed + 7919 * rank + counters.iteration)
    return counters
