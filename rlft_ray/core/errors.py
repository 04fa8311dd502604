"""Errors that say what kind of failure they are (no torch, no Ray here)."""

from __future__ import annotations


class DeterministicError(Exception):
    """A failure that repeats on a restart from the same checkpoint (a NaN loss, a reward
    function that raises, bad data or config): the run fails once, clearly, instead of
    being retried by ``resources.max_failures``. Mixed into such errors' classes."""


class CheckpointError(DeterministicError, ValueError):
    """A checkpoint is missing, incomplete or does not fit the run; names path and mismatch."""
