"""Checkpoint directories: safetensors weights, optimizer, counters, RNG, config.

Layout of a checkpoint directory::

    policy.safetensors    # the acting policy (what `rlft-ray eval` and `init_from` load)
    <module>.safetensors  # other learner modules (e.g. the DQN target network)
    policy/               # instead, for a Hugging Face model: a `save_pretrained` directory
                          # (safetensors + config + tokenizer) that `from_pretrained` loads
    optimizer.pt          # optimizer state (tensors and numbers: loaded with weights_only)
    state.json            # counters (iteration, env_steps, policy_version, ...) + spaces
    rng.json              # python / numpy / torch RNG state of rank 0 (plain JSON)
    config.yaml           # the resolved run config
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlft_ray.config import RunConfig, build_config, load_yaml, save_config
from rlft_ray.core.errors import CheckpointError

RECENT_EPISODES = 20


@dataclass
class Counters:
    """Run counters that continue across ``--resume``."""

    iteration: int = 0
    env_steps: int = 0
    policy_version: int = 0
    episodes: int = 0
    wall_s: float = 0.0
    recent_returns: list[float] = field(default_factory=list)
    recent_successes: list[bool] = field(default_factory=list)
    best_score: float | None = None

    def record_episodes(self, returns: list[float], successes: list[bool]) -> None:
        """Add finished episodes to the rolling window of the last 20."""
        self.episodes += len(returns)
        self.recent_returns = (self.recent_returns + list(returns))[-RECENT_EPISODES:]
        self.recent_successes = (self.recent_successes + list(successes))[-RECENT_EPISODES:]

    def return_mean(self) -> float | None:
        """Mean return over the last 20 episodes (None before the first ends)."""
        return float(np.mean(self.recent_returns)) if self.recent_returns else None


def save_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    counters: Counters,
    cfg: RunConfig,
    spaces_sig: dict[str, str],
    extras: Callable[[Path], None] | None = None,
) -> None:
    """Write a checkpoint directory at ``path`` (a fresh temp dir the caller hands to Ray).

    ``extras(path)`` writes further files (the learner's ``save_extras``, e.g. the tokenizer).
    """
    path.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        if _is_pretrained(module):
            module.save_pretrained(path / name)
            continue
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(path / f"{name}.safetensors"))
    if extras is not None:
        extras(path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / RNG_FILE).write_text(json.dumps(rng_state()))
    state = {
        "counters": asdict(counters),
        "algo": cfg.algo,
        "spaces": spaces_sig,
        "modules": sorted(modules),
    }
    (path / "state.json").write_text(json.dumps(state, indent=2))
    save_config(cfg, path / "config.yaml")


def read_state(path: str | Path) -> dict[str, Any]:
    """Read ``state.json`` of a checkpoint, with errors that name the path."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    has_policy = (
        (p / "policy.safetensors").is_file()
        or (p / "policy" / "config.json").is_file()
        or (p / "policy" / "adapter_config.json").is_file()  # LoRA: adapters of lm.model
        or (p / "rllib").is_dir()  # algo: rllib: RLlib's own checkpoint of the algorithm
    )
    if not (p / "state.json").is_file() or not has_policy:
        raise CheckpointError(
            f"{p} is not an rlft_ray checkpoint (needs state.json and policy.safetensors, "
            "policy/ or rllib/) nor an RLlib one"
        )
    return json.loads((p / "state.json").read_text())


def load_config_from_checkpoint(path: str | Path) -> RunConfig:
    """The run config saved in a checkpoint directory."""
    read_state(path)
    return build_config(base=load_yaml(Path(path) / "config.yaml"))


def check_compatible(
    path: str | Path, cfg: RunConfig, spaces_sig: dict[str, str], same_algo: bool = True
) -> dict[str, Any]:
    """Fail with what does not match when ``path`` cannot seed or resume this run.

    Args:
        path: The checkpoint directory.
        cfg: This run's config.
        spaces_sig: This run's ``Spaces.signature()``.
        same_algo: Require the checkpoint's algorithm (resume). ``init_from`` passes
            False: a policy trained by one algorithm may seed another (a PPO policy
            fine-tuned by filtered BC, an RSFT model by GRPO); the modules must still fit.
    """
    state = read_state(path)
    problems = []
    if same_algo and state["algo"] != cfg.algo:
        problems.append(f"algo is '{state['algo']}' there, '{cfg.algo}' here")
    for key, sig in spaces_sig.items():
        if state["spaces"].get(key) != sig:
            problems.append(f"{key} space is {state['spaces'].get(key)} there, {sig} here")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this run: " + "; ".join(problems))
    return state


def check_policy_fits(path: str | Path, policy: torch.nn.Module) -> None:
    """Before Ray starts: ``path``'s ``policy.safetensors`` has exactly ``policy``'s tensors
    and shapes (only the file header is read). A ``policy/`` (Hugging Face) directory is
    checked when it loads.

    Raises:
        CheckpointError: Naming the missing, unexpected or differently shaped tensors.
    """
    from safetensors import safe_open

    file = Path(path) / "policy.safetensors"
    if not file.is_file():
        return
    own = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    with safe_open(str(file), framework="pt") as f:
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    shapes = [
        f"{k} {theirs[k]} there, {own[k]} here" for k in own if k in theirs and own[k] != theirs[k]
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path}: its policy does not fit this run's (another algorithm's "
            f"network, or other hidden_sizes?): missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shapes {shapes[:3]}"
        )


def load_modules(
    path: str | Path, modules: dict[str, torch.nn.Module], names: list[str] | None = None
) -> list[str]:
    """Load ``{name}.safetensors`` into each module; shape mismatches name the tensor. Returns loaded names."""
    loaded = []
    for name, module in modules.items():
        if names is not None and name not in names:
            continue
        if _is_pretrained(module) and (Path(path) / name).is_dir():
            _load_pretrained_into(module, Path(path) / name)
            loaded.append(name)
            continue
        file = Path(path) / f"{name}.safetensors"
        if not file.is_file():
            continue
        tensors = load_file(str(file))
        own = module.state_dict()
        for key, value in tensors.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(
                    f"checkpoint {path}: {name}.{key} has shape {tuple(value.shape)}, "
                    f"this run's model has {tuple(own[key].shape)} (different hidden_sizes?)"
                )
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path}: {name} missing {missing}, unexpected {unexpected}"
            )
        module.load_state_dict({k: v.to(own[k].device) for k, v in tensors.items()})
        loaded.append(name)
    return loaded


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> Counters:
    """Restore optimizer, RNG and counters for ``--resume``."""
    p = Path(path)
    state = read_state(p)
    try:
        # weights_only: tensors, numbers and strings; a pickled object is refused, not run
        optimizer_state = torch.load(p / "optimizer.pt", weights_only=True)
    except Exception as exc:  # UnpicklingError, missing or torn file
        raise CheckpointError(
            f"{p / 'optimizer.pt'}: not a plain optimizer state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    optimizer.load_state_dict(optimizer_state)
    set_rng_state(p / RNG_FILE)
    return Counters(**state["counters"])


RNG_FILE = "rng.json"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG state as plain JSON (read back without unpickling)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(file: Path) -> None:
    """Restore the RNG state :func:`rng_state` wrote to ``file``.

    Raises:
        CheckpointError: The file is missing or not in that layout.
    """
    try:
        rng = json.loads(file.read_text())
        version, internal, gauss = rng["python"]
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        states = (
            (version, tuple(int(x) for x in internal), gauss),
            (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
            torch.tensor(rng["torch"], dtype=torch.uint8),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{file}: unreadable RNG state ({type(exc).__name__}: {exc})"
        ) from exc
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


RANK_STATE_DIR = "rank_state"


def save_rank_states(path: str | Path, states: list[dict[str, np.ndarray]]) -> None:
    """Write each learner rank's own state (``Learner.rank_state``) as ``rank_state/{rank}.npz``."""
    if not any(states):
        return
    directory = Path(path) / RANK_STATE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for rank, state in enumerate(states):
        np.savez(directory / f"{rank}.npz", **state)


def check_rank_states(path: str | Path, world_size: int) -> bool:
    """Whether ``path`` holds per-rank state, failing if it was saved by another number of ranks.

    Raises:
        CheckpointError: Saved by a different number of learner ranks (the replay shards
            would not line up).
    """
    directory = Path(path) / RANK_STATE_DIR
    if not directory.is_dir():
        return False
    saved = len(list(directory.glob("*.npz")))
    if saved != world_size:
        raise CheckpointError(
            f"checkpoint {path} holds per-rank state (e.g. replay) of {saved} learner rank(s), "
            f"this run has resources.num_learners={world_size}; resume with {saved}"
        )
    return True


def load_rank_state(path: str | Path, rank: int, world_size: int) -> dict[str, np.ndarray] | None:
    """This rank's saved state, or None when the checkpoint has none for this world size.

    Raises:
        CheckpointError: The checkpoint holds rank states for a different number of ranks
            (the replay shards would not line up).
    """
    if not check_rank_states(path, world_size):
        return None
    with np.load(Path(path) / RANK_STATE_DIR / f"{rank}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _is_pretrained(module: torch.nn.Module) -> bool:
    """A Hugging Face model (saved as a ``save_pretrained`` directory)?"""
    return hasattr(module, "save_pretrained") and hasattr(type(module), "from_pretrained")


def _load_pretrained_into(module: torch.nn.Module, directory: Path) -> None:
    """Copy the weights of the ``save_pretrained`` directory into ``module`` (same architecture).

    Loading through ``from_pretrained`` handles sharded files and tied weights. A LoRA
    adapter directory goes into a LoRA model as adapters, into a plain model merged.
    """
    from rlft_ray.lm.lora import is_adapter_dir, load_adapter_dir, load_merged, lora_of

    try:
        if lora_of(module):
            if not is_adapter_dir(directory):
                raise ValueError(
                    "a full model, not LoRA adapters: with lm.lora, init_from a LoRA run's "
                    "checkpoint, or `rlft-ray export` this one and make it lm.model"
                )
            load_adapter_dir(module, directory)
            return
        dtype = next(module.parameters()).dtype
        loaded = (
            load_merged(directory, {"dtype": dtype})
            if is_adapter_dir(directory)
            else type(module).from_pretrained(directory, dtype=dtype)
        )
    except Exception as exc:  # OSError, shape mismatch, ...: name the directory
        raise CheckpointError(f"cannot load {directory}: {type(exc).__name__}: {exc}") from exc
    own, theirs = module.state_dict(), loaded.state_dict()
    if set(own) != set(theirs):
        raise CheckpointError(
            f"{directory}: parameters differ from this run's model "
            f"(missing {sorted(set(own) - set(theirs))[:5]}, unexpected {sorted(set(theirs) - set(own))[:5]})"
        )
    for key, value in theirs.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{directory}: {key} has shape {tuple(value.shape)}, this run's model has {tuple(own[key].shape)}"
            )
    module.load_state_dict(theirs)
