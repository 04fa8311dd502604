"""Small shared helpers: atomic file writes, seeding, thread counts."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON version of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir(src: Path, dest: Path) -> None:
    """Atomically move the finished directory ``src`` to ``dest``, replacing any old one."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def torch_threads(cpus: float) -> int:
    """Threads for an actor holding ``cpus`` CPUs: at least 1, never more than it holds."""
    return max(1, int(cpus))


def weights_to_wire(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """CPU tensors as numpy arrays for the object store (where numpy has the dtype).

    Ray stores numpy arrays in shared memory and actors read them without unpickling
    each tensor, which makes weight sync several times faster than shipping tensors.
    """
    return {
        k: v.numpy() if v.device.type == "cpu" and v.dtype != torch.bfloat16 else v
        for k, v in weights.items()
    }


def weights_from_wire(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`weights_to_wire` (zero-copy views of read-only arrays)."""
    import warnings

    with warnings.catch_warnings():  # arrays from the object store are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.as_tensor(v) for k, v in weights.items()}
