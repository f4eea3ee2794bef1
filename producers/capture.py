"""Write capture on the primary: every write lands in the VM's image and in its change log.

:class:`CapturedVm` is the Python API (``write``, ``zero``, ``trim``, ``flush``, ``cut``) and the
block device the NBD export serves. Each write is logged first and then written to the image, so
the image is never ahead of the log; ``flush`` fsyncs the log and then the images, which is what
the hypervisor's FLUSH and FUA wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmreplica.catalog import now_ms
from vmreplica.errors import ConfigurationError, JournalIntegrityError
from vmreplica.image import DiskImage
from vmreplica.producers.changelog import ChangeLog, CutMark, RecordKind, Segment


class FencedWritesError(JournalIntegrityError):
    """This site is no longer the primary of the VM; writes are refused."""


class CapturedVm:
    """A primary VM's disks with capture: ``await vm.write("disk0", 0, data)``.

    Writes are synchronous system calls into the page cache (fast), so the async methods only
    exist to let an NBD server or a program await them uniformly.
    """

    def __init__(self, name: str, disks: Sequence[tuple[str, Path, int]], log_folder: Path,
                 first_cycle: int = 1) -> None:
        self.name = name
        self.disk_names = [disk for disk, _, _ in disks]
        self.images = [DiskImage.open(path) if path.exists() else DiskImage.create(path, size)
                       for _, path, size in disks]
        self._index = {disk: i for i, disk in enumerate(self.disk_names)}
        self.log = ChangeLog(log_folder)
        self.cycle_started_ms = now_ms()
        self.fenced_reason: str | None = None
        unshipped = self.log.open(first_cycle)
        if self.log.recovered_unclean:
            self._redo(unshipped)

    def _redo(self, segments: Sequence[Segment]) -> None:
        """After a crash, replay unshipped log records into the images (idempotent)."""
        for segment in segments:
            for record in segment.records:
                image = self.images[record.disk]
                if record.kind is RecordKind.WRITE:
                    image.write(record.offset, segment.read_data(record))
                elif record.kind is RecordKind.ZERO:
                    image.zero(record.offset, record.length)
                else:
                    image.trim(record.offset, record.length)
        for image in self.images:
            image.fsync()

    def disk(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigurationError(
                f"VM {self.name!r} has no disk {name!r}; its disks are "
                f"{', '.join(self.disk_names)}") from None

    def size(self, disk: str) -> int:
        return self.images[self.disk(disk)].size

    def _check(self, index: int, offset: int, length: int) -> None:
        if self.fenced_reason is not None:
            raise FencedWritesError(self.fenced_reason)
        size = self.images[index].size
        if offset < 0 or length < 0 or offset + length > size:
            raise ConfigurationError(
                f"write of {length} bytes at offset {offset} is past the end of disk "
                f"{self.disk_names[index]!r} of VM {self.name!r} ({size} bytes)")

    def write_sync(self, index: int, offset: int, data: bytes | memoryview) -> None:
        self._check(index, offset, len(data))
        self.log.write(index, offset, data)
        self.images[index].write(offset, data)

    def zero_sync(self, index: int, offset: int, length: int, trim: bool = False) -> None:
        self._check(index, offset, length)
        if trim:
            self.log.trim(index, offset, length)
            self.images[index].trim(offset, length)
        else:
            self.log.zero(index, offset, length)
            self.images[index].zero(offset, length)

    def flush_sync(self) -> None:
        self.log.sync()
        for image in self.images:
            image.fsync()

    async def write(self, disk: str, offset: int, data: bytes | memoryview) -> None:
        self.write_sync(self.disk(disk), offset, data)

    async def zero(self, disk: str, offset: int, length: int) -> None:
        self.zero_sync(self.disk(disk), offset, length)

    async def trim(self, disk: str, offset: int, length: int) -> None:
        self.zero_sync(self.disk(disk), offset, length, trim=True)

    async def flush(self) -> None:
        """Make every write so far durable, in the log and in the images."""
        self.flush_sync()

    def cut(self, application_consistent: bool = False) -> int:
        """End the current cycle at this instant (a crash-consistent point of all disks).

        ``application_consistent`` marks a cut taken while the guest was quiesced (fsfreeze,
        VSS). Returns the sealed cycle number.
        """
        started = self.cycle_started_ms
        self.cycle_started_ms = now_ms()
        for image in self.images:
            image.fsync()
        return self.log.cut(CutMark(application_consistent, started, self.cycle_started_ms))

    def pending_bytes(self) -> int:
        """Change-log bytes not yet shipped (the open segment and any sealed ones)."""
        return sum(p.stat().st_size for p in self.log.folder.glob("*.hrl"))

    def close(self) -> None:
        """Clean close: images fsynced, then the log's clean-close marker."""
        for image in self.images:
            image.fsync()
            image.close()
        self.log.close()
