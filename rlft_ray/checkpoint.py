"""Checkpoint directories: safetensors weights, optimizer, counters, RNG, config.

Layout of a checkpoint directory::

    policy.safetensors    # the acting policy (what `rlft-ray eval` and `init_from` load)
    <module>.safetensors  # other learner modules (e.g. the DQN target network)
    optimizer.pt          # optimizer state
    state.json            # counters (iteration, env_steps, policy_version, ...) + spaces
    rng.pt                # python / numpy / torch RNG state of rank 0
    config.yaml           # the resolved run config
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlft_ray.config import RunConfig, build_config, load_yaml, save_config

RECENT_EPISODES = 20


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the run; names path and mismatch."""


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
) -> None:
    """Write a checkpoint directory at ``path`` (a fresh temp dir the caller hands to Ray)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(path / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        path / "rng.pt",
    )
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
    if not (p / "state.json").is_file() or not (p / "policy.safetensors").is_file():
        raise CheckpointError(
            f"{p} is not an rlft_ray checkpoint (needs state.json and policy.safetensors)"
        )
    return json.loads((p / "state.json").read_text())


def load_config_from_checkpoint(path: str | Path) -> RunConfig:
    """The run config saved in a checkpoint directory."""
    read_state(path)
    return build_config(base=load_yaml(Path(path) / "config.yaml"))


def check_compatible(
    path: str | Path, cfg: RunConfig, spaces_sig: dict[str, str]
) -> dict[str, Any]:
    """Fail with what does not match when ``path`` cannot seed or resume this run."""
    state = read_state(path)
    problems = []
    if state["algo"] != cfg.algo:
        problems.append(f"algo is '{state['algo']}' there, '{cfg.algo}' here")
    for key, sig in spaces_sig.items():
        if state["spaces"].get(key) != sig:
            problems.append(f"{key} space is {state['spaces'].get(key)} there, {sig} here")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this run: " + "; ".join(problems))
    return state


def load_modules(
    path: str | Path, modules: dict[str, torch.nn.Module], names: list[str] | None = None
) -> list[str]:
    """Load ``{name}.safetensors`` into each module; shape mismatches name the tensor. Returns loaded names."""
    loaded = []
    for name, module in modules.items():
        if names is not None and name not in names:
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
    optimizer.load_state_dict(torch.load(p / "optimizer.pt", weights_only=False))
    rng = torch.load(p / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return Counters(**state["counters"])
