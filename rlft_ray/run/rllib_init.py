"""``init_from`` for ``algo: rllib``: the weights an RLlib algorithm starts from.

Either an RLlib RLModule checkpoint (an RLModule's, an Algorithm's, an ``algo: rllib``
run's ``checkpoint_*``) or an rlft-ray gym checkpoint (``algo: ppo`` / ``dqn`` /
``filtered_bc``), whose policy is first written as RLlib's default module
(:func:`~rlft_ray.learners.rllib_ckpt.export_rllib_module`). The weights must fit the
algorithm's module layer by layer (checked before Ray starts, naming the tensors); they
go into the learner's module and from there to the env runners.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlft_ray.config import RunConfig
from rlft_ray.core.errors import CheckpointError
from rlft_ray.learners import checkpoint as ckpt
from rlft_ray.learners.base import Spaces
from rlft_ray.learners.registry import get_learner_cls
from rlft_ray.learners.rllib import EnvInfo
from rlft_ray.learners.rllib_ckpt import export_rllib_module, module_dir, read_rllib_module

#: The single-agent module inside an Algorithm (what ``restore_from_path`` restores).
MODULE_COMPONENT = "learner_group/learner/rl_module/default_policy"


@contextmanager
def _source_module(cfg: RunConfig, env: EnvInfo) -> Iterator[Path]:
    """The RLModule directory ``init_from`` provides (an rlft-ray policy converted into a
    temporary one)."""
    path = Path(str(cfg.init_from))
    if env.multi_agent:
        raise CheckpointError(
            f"init_from {path}: multi-agent runs start from a fresh module or --resume"
        )
    found = module_dir(path)
    if found is not None:
        yield found
        return
    state = ckpt.read_state(path)  # an rlft-ray checkpoint, or an error naming the path
    src_cfg = ckpt.load_config_from_checkpoint(path)
    policy = get_learner_cls(state["algo"]).make_policy(
        src_cfg, Spaces(env.observation, env.action)
    )
    ckpt.load_modules(path, {"policy": policy}, names=["policy"])
    with tempfile.TemporaryDirectory(prefix="rlft_to_rllib_") as tmp:
        export_rllib_module(policy, env.observation, env.action, Path(tmp) / "module")
        yield Path(tmp) / "module"


def check_init_from(cfg: RunConfig, env: EnvInfo, algo_config: Any) -> None:
    """``init_from`` fits the module ``algo_config`` builds: same tensors, same shapes.

    Raises:
        CheckpointError: Naming the missing, unexpected or differently shaped tensors.
    """
    spec = algo_config.get_rl_module_spec(
        spaces={"default_policy": (env.observation, env.action)}, inference_only=False
    )
    own = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    with _source_module(cfg, env) as src:
        cls_name, _, weights = read_rllib_module(src)
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(set(own) - set(theirs))
    shapes = [
        f"{k} {theirs[k]} there, {own[k]} here" for k in own if k in theirs and own[k] != theirs[k]
    ]
    if missing or shapes:
        raise CheckpointError(
            f"init_from {cfg.init_from} ({cls_name}) does not fit RLlib "
            f"{cfg.rllib.algorithm}'s module (another algorithm, or other "
            f"rllib.config.model_config fcnet_hiddens?): missing {missing[:4]}, shapes {shapes[:3]}"
        )


def restore_init_from(algo: Any, cfg: RunConfig, env: EnvInfo) -> None:
    """Load ``init_from``'s weights into the algorithm's module (learner and env runners)."""
    with _source_module(cfg, env) as src:
        algo.restore_from_path(str(src), component=MODULE_COMPONENT)
