"""The on-disk cache that converted models and test fixtures share: where it is, content
hashes that key it, and a lock so that processes on one machine fill an entry only once."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Environment variable naming the cache directory (default ``~/.cache/rlft_ray``).
CACHE_ENV = "RLFT_RAY_CACHE"

_HASHES: dict[tuple[str, int, int], str] = {}


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$RLFT_RAY_CACHE``, else
    ``~/.cache/rlft_ray`` (``~`` expanded; not created here)."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or "~/.cache/rlft_ray"
    return Path(cache_dir).expanduser()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, remembered per process while its size and mtime hold
    (a multi-GB model is hashed once per process, not once per loader call)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    memo_key = (real, stat.st_size, stat.st_mtime_ns)
    if memo_key not in _HASHES:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[memo_key] = digest.hexdigest()
    return _HASHES[memo_key]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block:
    the processes of one machine (driver, actors, learners) take turns filling one cache
    entry. The lock file stays behind; it holds no data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
