"""One writer per run directory (``.lock``), and the clean-up after interrupted atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any


class RunDirBusyError(RuntimeError):
    """Another process writes the run directory; the message names it."""


LOCK_FILE = ".lock"


class RunDirLock:
    """One writer per run directory: ``.lock`` holds the writer's host and pid.

    Taken with ``O_CREAT | O_EXCL`` (atomic on a local or NFS filesystem). A lock whose
    holder is gone (same host, no such process) is stale and taken over; a live holder,
    or one on another host (which cannot be checked), refuses the second writer.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            RunDirBusyError: Naming the holder and how to clear a lock left behind.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            # written whole beside it, then linked into place: the link fails if a lock
            # exists, and a reader never sees an empty or half-written one
            tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
                    raise RunDirBusyError(
                        f"{self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} since {since} (a run, --resume or job still "
                        f"writing it); wait for it or stop it. If that process is gone, "
                        f"delete {self.path}"
                    ) from None
                if holder is not None and self._holder() != holder:
                    continue  # taken over by another process meanwhile: look again
                self.path.unlink(missing_ok=True)  # stale: the holder is gone
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            return
        raise RunDirBusyError(f"{self.path.parent}: another process took {self.path} just now")

    def release(self) -> None:
        """Drop the lock (only our own)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return {
                "host": str(holder["host"]),
                "pid": int(holder["pid"]),
                "since": float(holder["since"]),
            }
        except FileNotFoundError:
            return None  # released just now
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable (written by hand, or by an older version): nobody we can check
            return {"host": "?", "pid": -1, "since": 0.0}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        if holder["host"] != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return True  # left by an earlier run in this process
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


#: Leftovers of an interrupted write: a checkpoint copy being made, a file being replaced.
_TEMP_PATTERNS = (".checkpoint_last.*", ".checkpoint_best.*", ".*.tmp")


def remove_temp_files(output_dir: Path) -> list[str]:
    """Clean up after interrupted atomic writes in ``output_dir``; returns what was removed.

    A directory replacement cut between its two renames (:func:`~rlft_ray.core.fileio.replace_dir`)
    left the old copy aside and no ``checkpoint_last``: the old copy is put back first (it
    is whole, and the rows after its iteration are re-run), then every temp leftover goes.
    """
    output_dir = Path(output_dir)
    for old in output_dir.glob(".*.old-*"):
        target = output_dir / old.name[1:].split(".old-")[0]
        if old.is_dir() and not target.exists():
            os.replace(old, target)
    removed = []
    for pattern in (*_TEMP_PATTERNS, ".*.old-*"):
        for path in output_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
