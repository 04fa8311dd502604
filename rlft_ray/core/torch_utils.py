"""Small torch helpers: seeding, thread counts, weights on the wire (file writes: ``fileio``)."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Restore torch's thread count and the python, numpy and torch RNGs on exit.

    A run started from another program (a notebook, a script calling ``run_training``)
    builds policies with the global RNGs, and with the learner in its process (local mode)
    seeds them and sets the thread count to the CPUs the learner holds; without this the
    caller's torch code would go on with one thread after the run.
    """
    threads = torch.get_num_threads()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def torch_threads(cpus: float) -> int:
    """Threads for an actor holding ``cpus`` CPUs: at least 1, never more than it holds."""
    return max(1, int(cpus))


def hold_threads(num_threads: int) -> None:
    """Use only the CPUs this process holds: torch's intra-op threads, and the Rust
    tokenizer's thread pool (which would otherwise spread batch encode/decode over every
    core of the machine and slow the other actors there). Call before the first
    tokenizer use in the process."""
    n = max(1, int(num_threads))
    torch.set_num_threads(n)
    os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    if n == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def fused_optimizer(
    cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any
) -> torch.optim.Optimizer:
    """``cls(params, fused=True, **kwargs)`` (Adam / AdamW) where torch has a fused kernel
    for the parameters' device and dtypes, else the default implementation.

    The fused kernel updates every tensor in one call; the default loops over them in
    Python, which is most of a small model's optimizer step on a CPU. Same update rule.
    """
    params = list(params)
    try:
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return cls(params, **kwargs)


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Second names of tied tensors -> the first name of the same tensor: an LM head that
    is the input embedding. The same storage (or, on the meta device, the same parameter
    object of a ``keep_vars`` state dict) counts as one tensor."""
    first: dict[object, str] = {}
    aliases = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            key: object = id(tensor)
        else:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def distinct_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second names of tied tensors (:func:`tied_aliases`): tied
    weights are published and loaded once, not twice."""
    aliases = tied_aliases(state)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``getrusage``; 0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024  # bytes on macOS


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). An update's activations are freed into the heap, which glibc keeps: a
    real model's learner then held 0.6-1.1 GB more between updates than it used."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once; None off Linux or on another C library."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return None
