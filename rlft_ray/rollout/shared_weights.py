"""Policy weights through shared memory, for rollout actors on the learner's own machine.

Publishing through the object store costs a ``ray.put`` and an object fetch in every
actor: about 4 ms of a 40 ms GRPO iteration on a 2-core machine, for a model of 0.5 MB.
On a local instance (one machine by construction) the learner instead copies its
weights into one of a few slots of a file in ``/dev/shm`` that every actor maps, and the
``set_weights`` call carries only a :class:`SharedSlot` (the file, the layout, the
version). The slot is the version modulo the number of slots; the learner overwrites a
slot only after it has collected a batch sampled after that slot was read (see
:class:`~rlft_ray.rollout.group.RunnerGroup`), and a reader checks the slot's version
before and after its copy, so a torn read fails (the actor is then restored with the
weights themselves) instead of loading a mix of two policies.

The learner writes the file with ``pwrite`` and never maps it, so the weights' pages are in
the readers' memory only. With one slot (a synchronous loop: no actor samples while the
learner writes) an actor's parameters are the slot's pages themselves (see
:meth:`SharedSlot.borrowed`): one copy of the model between the file and every actor on the
machine, not one per process.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlft_ray.core.torch_utils import weights_from_wire

#: Where the file lives: RAM-backed on Linux.
SHM_DIR = Path("/dev/shm")
#: Slots in the file with overlapped sampling: the one being read, the one being written,
#: one spare. A synchronous loop needs one: every actor has read version v before the batch
#: it samples with v is collected, and v + 1 is written only after that.
SLOTS = 3
#: Largest file (all slots); bigger models publish through the object store. A real
#: model goes through the file too: the object store would hold a new copy per update in
#: pages both processes touch (the learner's RSS grew by 1.5 GB in two updates of a 135M
#: model), the file holds ``slots`` copies, mapped by every process.
MAX_BYTES = 4 * 2**30
#: The file's name: this prefix, the learner's pid, a random suffix.
PREFIX = "rlft_ray_weights_"
_ALIGN = 64  # every tensor starts on a cache line (and on its dtype's size)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_HEADER = _ALIGN  # one int64 version per slot (-1: being written)


def _file_bytes(slot_bytes: int, slots: int) -> int:
    return _HEADER + slots * slot_bytes


def _slot(
    buf: torch.Tensor, version: int, slot_bytes: int, slots: int
) -> tuple[torch.Tensor, int, int]:
    """The header (versions per slot), the slot index of ``version`` and its first byte."""
    slot = version % slots
    return buf[:_HEADER].view(torch.int64), slot, _HEADER + slot * slot_bytes


Layout = tuple[tuple[str, str, tuple[int, ...], int, int], ...]


def _views(buf: torch.Tensor, base: int, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of the slot at byte ``base``, as views into the mapped file."""
    return {
        name: buf[base + offset : base + offset + nbytes].view(getattr(torch, dtype)).view(shape)
        for name, dtype, shape, offset, nbytes in layout
    }


_MAPS: dict[str, torch.Tensor] = {}  # this process's mappings, by path


def _mapped(path: str, size: int) -> torch.Tensor:
    """The file as a shared ``uint8`` tensor, mapped once per process."""
    buf = _MAPS.get(path)
    if buf is None or buf.numel() != size:
        _MAPS.clear()  # a new run's file: let the old mapping go
        buf = _MAPS[path] = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    return buf


class StaleWeightsError(RuntimeError):
    """A shared slot held another version than the one asked for (overwritten)."""


@dataclass(frozen=True)
class SharedSlot:
    """What a ``set_weights`` call carries instead of the weights: where to read them.

    Attributes:
        path: The shared file.
        layout: ``(name, dtype, shape, offset, nbytes)`` of each tensor within a slot.
        slot_bytes: Size of one slot.
        version: The policy version to read (slot ``version % slots``).
        slots: Slots in the file.
    """

    path: str
    layout: Layout
    slot_bytes: int
    version: int
    slots: int = SLOTS

    def _header(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        buf = _mapped(self.path, _file_bytes(self.slot_bytes, self.slots))
        return (buf, *_slot(buf, self.version, self.slot_bytes, self.slots))

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[dict[str, torch.Tensor]]:
        """The slot's tensors as views into the mapped file, without :meth:`read`'s copy,
        for a reader that copies them itself (into a model's parameters, an engine's
        reload): no 0.5 GB clone of a real model. Hold the views only inside the block.

        Raises:
            StaleWeightsError: The slot does not hold :attr:`version` before the block, or
                was overwritten while it ran (what was loaded is then a mix of two versions).
        """
        buf = _mapped(self.path, _file_bytes(self.slot_bytes, self.slots))
        header, slot, base = _slot(buf, self.version, self.slot_bytes, self.slots)
        if int(header[slot]) != self.version:
            raise StaleWeightsError(
                f"slot {slot} holds version {int(header[slot])}, not {self.version}"
            )
        yield _views(buf, base, self.layout)
        if int(header[slot]) != self.version:
            raise StaleWeightsError(
                f"slot {slot} was overwritten while version {self.version} was loaded"
            )

    def read(self) -> dict[str, torch.Tensor]:
        """A copy of the slot's tensors.

        Raises:
            StaleWeightsError: The slot does not hold :attr:`version` (before or after the copy).
        """
        with self.borrowed() as views:
            return {name: view.clone() for name, view in views.items()}


def received_weights(weights: Any) -> dict[str, torch.Tensor]:
    """What an actor's ``set_weights`` received, as tensors: read from a
    :class:`SharedSlot`, or the object store's arrays (:func:`~rlft_ray.core.torch_utils.weights_from_wire`)."""
    if isinstance(weights, SharedSlot):
        return weights.read()
    return weights_from_wire(weights)


class SharedWeights:
    """The learner's side: a file of ``slots`` slots, made on the first :meth:`write`.

    Args:
        directory: Where to make the file (``/dev/shm``).
        max_bytes: Largest file; weights that would need more are not shared.
        slots: :data:`SLOTS` with overlapped sampling, 1 for a synchronous loop.
    """

    def __init__(
        self, directory: Path = SHM_DIR, max_bytes: int = MAX_BYTES, slots: int = SLOTS
    ) -> None:
        self.directory, self.max_bytes, self.slots = directory, max_bytes, slots
        self.path: Path | None = None
        self.layout: Layout = ()
        self.slot_bytes = 0
        self.fd: int | None = None  # open for writing while the file exists

    def write(self, weights: dict[str, torch.Tensor], version: int) -> SharedSlot | None:
        """Copy ``weights`` (CPU tensors) into slot ``version % slots``, with ``pwrite``: the
        learner does not map the file (its pages would count in its memory too).

        Returns:
            The slot to hand to the actors; None when the weights are too large or the file
            cannot be made (no ``/dev/shm``, or too little room there): publish them
            through the object store then.
        """
        layout = self._layout(weights)
        if layout != self.layout and not self._make(layout):
            return None
        slot = version % self.slots
        base = _HEADER + slot * self.slot_bytes
        self._write_version(slot, -1)  # readers of an older version in this slot now fail
        for name, _, _, offset, _ in self.layout:
            value = weights[name].detach().contiguous().reshape(-1)
            _pwrite_all(self.fd, value.view(torch.uint8).numpy(), base + offset)
        self._write_version(slot, version)
        return SharedSlot(str(self.path), self.layout, self.slot_bytes, version, self.slots)

    def _write_version(self, slot: int, version: int) -> None:
        _pwrite_all(self.fd, struct.pack("<q", version), 8 * slot)

    def close(self) -> None:
        """Remove the file (actors that mapped it keep their mapping until they drop it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self.layout = ()

    @staticmethod
    def _layout(weights: dict[str, torch.Tensor]) -> Layout:
        layout, offset = [], 0
        for name, value in weights.items():
            nbytes = value.numel() * value.element_size()
            layout.append(
                (name, str(value.dtype).removeprefix("torch."), tuple(value.shape), offset, nbytes)
            )
            offset += _aligned(nbytes)
        return tuple(layout)

    def _make(self, layout: Layout) -> bool:
        self.close()
        slot_bytes = sum(_aligned(entry[4]) for entry in layout) or _ALIGN  # lines, aligned
        size = _file_bytes(slot_bytes, self.slots)
        if size > self.max_bytes or not self.directory.is_dir():
            return False
        _remove_orphans(self.directory)
        path = self.directory / f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
        fd = None
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            # Reserve the pages now: a full /dev/shm then fails here, not as SIGBUS later.
            os.posix_fallocate(fd, 0, size)
        except OSError:
            if fd is not None:
                os.close(fd)
            path.unlink(missing_ok=True)
            return False
        self.fd, self.path, self.layout, self.slot_bytes = fd, path, layout, slot_bytes
        _pwrite_all(fd, struct.pack(f"<{_HEADER // 8}q", *[-1] * (_HEADER // 8)), 0)
        return True


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (a bytes-like object) at ``offset`` (``pwrite`` may write less
    than asked: about 2 GiB at most per call on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _remove_orphans(directory: Path) -> None:
    """Remove the files of learners that are gone (killed before :meth:`SharedWeights.close`)."""
    for path in directory.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
