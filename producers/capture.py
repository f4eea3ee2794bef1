"""Write capture on the primary: every write lands in the VM's image and in its change log.

:class:`CapturedVm` is the Python API (``write``, ``zero``, ``trim``, ``flush``, ``cut``) and what
the NBD export's journaling device writes through. Each write is logged first and then written to
the image, so the image is never ahead of the log; ``flush`` fsyncs the log and then the images,
which is what the hypervisor's FLUSH and FUA wait for.

**Budget.** The open change-log segment may grow to ``budget_bytes`` (default: a tenth of the
VM's total disk size). A write that would take it past that does not stop replication and does
not start a full resync: capture *degrades* to a dirty-block map
(:class:`~vmreplica.producers.dirtymap.DirtyMap`) for the rest of the cycle.
Writes then go to the image only and mark their 64 KiB blocks dirty; zeroing and trims are still
logged (their records are tiny). At the cut the dirty blocks are read from the image and
appended to the segment before it is sealed, so the shipper sends them as ordinary writes and the
replica is exact at that cycle boundary. The map is kept crash-safe the same way as the log: a
block's mark is appended to ``dirty.map`` *before* the image is written (a killed process keeps
it), and FLUSH fsyncs the map before the images. After a crash, redo skips dirty blocks, whose
image content is newer than the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.errors import (
    ConfigurationError,
    FencedWritesError,
)
from vmreplica.producers.changelog import ChangeLog, CutMark, RecordKind, Segment
from vmreplica.producers.dirtymap import DIRTY_MAP_NAME, DIRTY_RUN_BLOCKS, DirtyMap
from vmreplica.storage.image import DiskImage
from vmreplica.storage.safefile import NO_SPACE_ERRNOS

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION: Final = 0.10
"""Default change-log budget as a fraction of the VM's total disk size."""
MIN_BUDGET_BYTES: Final = 1024 * 1024
"""The default budget is never smaller than this (tiny test disks)."""


def default_budget(disk_sizes: Iterable[int]) -> int:
    """The change-log budget of a VM whose settings do not set one."""
    return max(MIN_BUDGET_BYTES, int(sum(disk_sizes) * DEFAULT_BUDGET_FRACTION))


def _fsync_all(fds: Sequence[int]) -> None:
    """fsync in order (log, dirty map, images), closing every fd even if one fails."""
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


class CapturedVm:
    """A primary VM's disks with capture: ``await vm.write("disk0", 0, data)``.

    Writes are synchronous system calls into the page cache (fast), so the async write methods
    only exist to let an NBD server or a program await them uniformly; :meth:`flush` runs its
    fsyncs in a worker thread and concurrent flushes share one round (group commit).

    ``budget_bytes`` bounds the open change-log segment (None: :func:`default_budget`).
    ``redo=False`` skips replaying unshipped records into the images after a crash: the scan
    capture needs that, as its records are copies of the image that the guest may since have
    overwritten.
    """

    def __init__(
        self,
        name: str,
        disks: Sequence[tuple[str, Path, int]],
        log_folder: Path,
        first_cycle: int = 1,
        *,
        budget_bytes: int | None = None,
        redo: bool = True,
    ) -> None:
        self.name = name
        self.disk_names = [disk for disk, _, _ in disks]
        self.images = [
            DiskImage.open(path) if path.exists() else DiskImage.create(path, size)
            for _, path, size in disks
        ]
        self._index = {disk: i for i, disk in enumerate(self.disk_names)}
        self._image_fds = [image._fd for image in self.images]  # the hot path's pwrite
        if budget_bytes is not None and budget_bytes <= 0:
            raise ConfigurationError(
                f"VM {name!r}: the change-log budget must be a positive number of bytes, "
                f"not {budget_bytes}"
            )
        self.budget_bytes = budget_bytes or default_budget(i.size for i in self.images)
        self.log = ChangeLog(log_folder)
        self.cycle_started_ms = now_ms()
        self.fenced_reason: str | None = None
        self.dirty: DirtyMap | None = None
        """The dirty-block map while the open cycle is over budget, else None."""
        self.degraded_cycles = 0
        """Cycles whose capture degraded to the dirty-block map (since this object opened)."""
        self.last_cut_dirty_bytes = 0
        """Bytes the last cut copied from the images for dirty blocks (0: not degraded)."""
        self._write_seq = 0
        self._durable_seq = 0
        self._sync_round: asyncio.Future[None] | None = None
        self.log_lock = threading.Lock()
        """Held by worker threads around each append (scan feed, dirty-block copies) and by
        :meth:`cut`, so a cut never interleaves with a thread's append."""
        unshipped = self.log.open(first_cycle)
        entries = DirtyMap.load(self._dirty_path)
        if entries is not None:
            # Kept from before a restart (or a crash during a cut: re-sending is harmless).
            self.dirty = DirtyMap.create(self._dirty_path, self.log.cycle, entries)
        if self.log.recovered_unclean and redo:
            self._redo(unshipped)

    @property
    def _dirty_path(self) -> Path:
        return self.log.folder / DIRTY_MAP_NAME

    def _redo(self, segments: Sequence[Segment]) -> None:
        """After a crash, replay unshipped log records into the images (idempotent).

        Dirty blocks are skipped: their image content is newer than any record.
        """
        for segment in segments:
            for record in segment.records:
                image = self.images[record.disk]
                ranges: Iterable[tuple[int, int]] = (
                    [(record.offset, record.length)]
                    if self.dirty is None
                    else self.dirty.clean_ranges(record.disk, record.offset, record.length)
                )
                for offset, length in ranges:
                    if record.kind is RecordKind.WRITE:
                        image.write(
                            offset, segment.read_data(record, offset - record.offset, length)
                        )
                    elif record.kind is RecordKind.ZERO:
                        image.zero(offset, length)
                    else:
                        image.trim(offset, length)
        for image in self.images:
            image.fsync()

    def disk(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigurationError(
                f"VM {self.name!r} has no disk {name!r}; its disks are {', '.join(self.disk_names)}"
            ) from None

    def size(self, disk: str) -> int:
        return self.images[self.disk(disk)].size

    def _check(self, index: int, offset: int, length: int) -> None:
        if self.fenced_reason is not None:
            raise FencedWritesError(self.fenced_reason)
        size = self.images[index].size
        if offset < 0 or length < 0 or offset + length > size:
            raise ConfigurationError(
                f"write of {length} bytes at offset {offset} is past the end of disk "
                f"{self.disk_names[index]!r} of VM {self.name!r} ({size} bytes)"
            )

    def _degrade(self, why: str) -> DirtyMap:
        """The open segment reached its budget, or the change log's file system is full (the
        same answer: the dirty-block map costs a bit per block, not the data): track dirty
        blocks until the cut."""
        self.dirty = DirtyMap.create(self._dirty_path, self.log.cycle)
        self.degraded_cycles += 1
        log.warning(
            "VM %s: change log stops taking data in cycle %d: %s; tracking dirty blocks "
            "until the cut, which ships them from the images",
            self.name,
            self.log.cycle,
            why,
        )
        return self.dirty

    def write_sync(self, index: int, offset: int, data: bytes | memoryview) -> None:
        self._check(index, offset, len(data))
        self.write_in_bounds(index, offset, data)

    def write_in_bounds(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """:meth:`write_sync` for a caller that checked the range and the fencing itself.

        The journaling device's hot path (the NBD server validated the request).
        """
        self._write_seq += 1
        length = len(data)
        dirty = self.dirty
        if dirty is None:
            log = self.log
            if log.segment_bytes + length <= self.budget_bytes:
                try:
                    log.write(index, offset, data)
                except OSError as error:
                    if error.errno not in NO_SPACE_ERRNOS:
                        raise
                    dirty = self._degrade(f"its file system is full ({error.strerror})")
                else:
                    self._pwrite(index, offset, data, length)
                    return
            else:
                dirty = self._degrade(f"it reached its budget of {self.budget_bytes} bytes")
        dirty.mark(index, offset, length)
        self._pwrite(index, offset, data, length)
        dirty.uncopy(index, offset, length)

    def _pwrite(self, index: int, offset: int, data: bytes | memoryview, length: int) -> None:
        written = os.pwrite(self._image_fds[index], data, offset)
        if written != length:  # short only when the disk is full: finish, or raise ENOSPC
            self.images[index].write(offset + written, memoryview(data)[written:])

    def zero_sync(self, index: int, offset: int, length: int, trim: bool = False) -> None:
        self._check(index, offset, length)
        self._write_seq += 1
        if trim:
            self.log.trim(index, offset, length)
            self.images[index].trim(offset, length)
        else:
            self.log.zero(index, offset, length)
            self.images[index].zero(offset, length)
        if self.dirty is not None:
            self.dirty.uncopy(index, offset, length)

    def flush_sync(self) -> None:
        """Make every write so far durable: log, then dirty map, then images."""
        self.log.sync()
        if self.dirty is not None:
            self.dirty.sync()
        for image in self.images:
            image.fsync()
        self._durable_seq = self._write_seq

    async def write(self, disk: str, offset: int, data: bytes | memoryview) -> None:
        self.write_sync(self.disk(disk), offset, data)

    async def zero(self, disk: str, offset: int, length: int) -> None:
        self.zero_sync(self.disk(disk), offset, length)

    async def trim(self, disk: str, offset: int, length: int) -> None:
        self.zero_sync(self.disk(disk), offset, length, trim=True)

    def mark_unsynced(self) -> None:
        """Records went into the log other than through the write methods (a scan's feed,
        dirty-block copies): the next :meth:`flush` must fsync even if nothing else was written.
        """
        self._write_seq += 1

    async def flush(self) -> None:
        """Make every write completed so far durable, in the log and in the images.

        The fsyncs run in a worker thread on duplicates of the file descriptors (a cut may
        replace the log's meanwhile); flushes that arrive while a round runs share the next one.
        """
        target = self._write_seq
        while self._durable_seq < target:
            round_ = self._sync_round
            if round_ is None:
                round_ = self._sync_round = asyncio.ensure_future(self._sync())
            await asyncio.shield(round_)

    async def _sync(self) -> None:
        try:
            covered = self._write_seq
            # Duplicates of the log's and the images' own descriptors: a cut may close the
            # log's while the thread fsyncs, and fsync reaches the file through any descriptor.
            fds = [os.dup(self.log._fd)]
            if self.dirty is not None and (dirty_fd := self.dirty.dup_fd()) >= 0:
                fds.append(dirty_fd)
            fds += [os.dup(image._fd) for image in self.images]
            await asyncio.to_thread(_fsync_all, fds)
            self._durable_seq = max(self._durable_seq, covered)
        finally:
            self._sync_round = None

    def cut(self, application_consistent: bool = False) -> int:
        """End the current cycle at this instant (a crash-consistent point of all disks).

        ``application_consistent`` marks a cut taken while the guest was quiesced (fsfreeze,
        VSS). When the cycle degraded to the dirty-block map, its blocks are copied from the
        images into the segment first. Returns the sealed cycle number.
        """
        started = self.cycle_started_ms
        self.cycle_started_ms = now_ms()
        with self.log_lock:
            dirty = self.dirty
            if dirty is not None:
                self._log_dirty_blocks(dirty)
            self.last_cut_dirty_bytes = 0 if dirty is None else dirty.copied_bytes
            for image in self.images:
                image.fsync()
            sealed = self.log.cut(CutMark(application_consistent, started, self.cycle_started_ms))
            if dirty is not None:
                dirty.remove()
                self.dirty = None
                log.info(
                    "VM %s: cycle %d carries %d bytes of dirty blocks read from the images",
                    self.name,
                    sealed,
                    self.last_cut_dirty_bytes,
                )
        self._durable_seq = self._write_seq  # the cut fsynced the log and every image
        return sealed

    async def prepare_cut(self) -> int:
        """Copy dirty blocks into the open segment ahead of :meth:`cut`, while writes go on.

        Optional: it only shortens the cut, which then copies just the blocks written (or
        zeroed) since their copy was taken — the copying runs in a worker thread instead of
        holding up the event loop, and so the VM's I/O, for the whole dirty set. Returns the
        bytes copied (0 when the cycle is not degraded).
        """
        dirty = self.dirty
        if dirty is None:
            return 0
        runs = [(index, list(dirty.runs(index))) for index in range(len(self.images))]
        copied = await asyncio.to_thread(self._copy_runs, dirty, runs, True)
        if copied:
            self.mark_unsynced()
        return copied

    def _copy_runs(
        self, dirty: DirtyMap, runs: Sequence[tuple[int, Sequence[tuple[int, int]]]], ahead: bool
    ) -> int:
        """Append the current image content of dirty-block runs to the open segment.

        ``ahead`` (a worker thread, writes going on): each run is recorded as copied *before*
        it is read, so a write racing with the read un-records it and the cut copies it again.
        """
        copied = 0
        size = dirty.block_bytes
        zeros = bytes(size * DIRTY_RUN_BLOCKS)
        for index, disk_runs in runs:
            image = self.images[index]
            done = dirty.copied.setdefault(index, set())
            for first, count in disk_runs:
                offset = first * size
                length = min(count * size, image.size - offset)
                if length <= 0:
                    continue
                with contextlib.nullcontext() if not ahead else self.log_lock:
                    if dirty is not self.dirty:
                        return copied  # cut meanwhile (its own copy covered everything)
                    if ahead:
                        done.update(range(first, first + count))
                    data = image.read(offset, length)
                    if data == zeros[:length]:
                        self.log.zero(index, offset, length)
                    else:
                        self.log.write(index, offset, data)
                copied += length
                dirty.copied_bytes += length
        return copied

    def _log_dirty_blocks(self, dirty: DirtyMap) -> int:
        """Append the dirty blocks not yet copied to the open segment (inside the cut)."""
        runs = [(index, list(dirty.runs(index))) for index in range(len(self.images))]
        return self._copy_runs(dirty, runs, False)

    def close(self) -> None:
        """Clean close: images fsynced, dirty map fsynced, then the log's clean-close marker."""
        with self.log_lock:  # a worker thread still copying (its caller was cancelled) stops
            if self.dirty is not None:
                self.dirty.sync()
                self.dirty.close()
                self.dirty = None  # the file stays: the next open resumes the map
            for image in self.images:
                image.fsync()
                image.close()
            self.log.close()
