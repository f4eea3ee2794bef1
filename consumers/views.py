"""Views of a recovery point: a replica disk as it was at a point, while replication goes on.

A :class:`PointView` is what test failover serves (as ``<vm> - Test``): reads return the point's
content — the head image under an overlay of the undo records newer than the point, kept in a
file (:class:`~vmreplica.consumers.overlay.Overlay`), not in memory — and writes go to a sparse
scratch file, never to the replica. Cycles applied while the view exists first
hand their undo records to :meth:`PointView.preserve` (before the image changes), so the view
stays at its point. Creating a view costs the changes since the point, not the disk size.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmreplica.consumers.overlay import Overlay
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.intervals import IntervalSet
from vmreplica.storage.image import DiskImage


class PointView:
    """All disks of one VM at one recovery point, with a writable scratch layer."""

    def __init__(
        self,
        heads: dict[str, DiskImage],
        undo: UndoLog,
        point_cycle: int,
        head_cycle: int,
        scratch_folder: Path,
    ) -> None:
        self.heads = heads
        self.point_cycle = point_cycle
        self.overlay: Overlay = undo.overlay_at(point_cycle, head_cycle)
        scratch_folder.mkdir(parents=True, exist_ok=True)
        self.scratch_folder = scratch_folder
        self.scratch = {
            disk: DiskImage.create(scratch_folder / f"{disk}.scratch", head.size)
            for disk, head in heads.items()
        }
        self.written = {disk: IntervalSet() for disk in heads}

    def preserve(self, disk: str, offset: int, old: bytes | memoryview) -> None:
        """Keep the content a newer cycle is about to overwrite (older content wins)."""
        self.overlay.add(disk, offset, old)

    def read(self, disk: str, offset: int, length: int) -> bytes:
        content = bytearray(self.overlay.read(disk, offset, length, self.heads[disk]))
        for low, high in self.written[disk].covered(offset, offset + length):
            content[low - offset : high - offset] = self.scratch[disk].read(low, high - low)
        return bytes(content)

    def write(self, disk: str, offset: int, data: bytes | memoryview) -> None:
        self.scratch[disk].write(offset, data)
        self.written[disk].add(offset, offset + len(data))

    def zero(self, disk: str, offset: int, length: int) -> None:
        self.scratch[disk].zero(offset, length)
        self.written[disk].add(offset, offset + length)

    def size(self, disk: str) -> int:
        return self.heads[disk].size

    def close(self) -> None:
        """Discard the overlay and the scratch layer (what stopping a test failover does)."""
        self.overlay.close()
        for disk, image in self.scratch.items():
            image.close()
            os.unlink(self.scratch_folder / f"{disk}.scratch")


class ViewDisk:
    """One disk of a :class:`PointView` as an NBD block device."""

    def __init__(self, view: PointView, disk: str) -> None:
        self.view = view
        self.disk = disk

    @property
    def size(self) -> int:
        return self.view.size(self.disk)

    async def read(self, offset: int, length: int) -> bytes:
        return self.view.read(self.disk, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.view.write(self.disk, offset, data)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.view.zero(self.disk, offset, length)

    async def trim(self, offset: int, length: int) -> None:
        self.view.zero(self.disk, offset, length)

    async def flush(self) -> None:
        """Scratch data is thrown away when the test stops; nothing to make durable."""
