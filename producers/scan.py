"""Change-tracking scan: capture for disk images the agent cannot sit in front of.

When the hypervisor writes the image file directly (``--capture scan``), nothing sees the
writes. At each cycle the scanner instead reads every allocated block of every disk, hashes it
(:mod:`vmreplica.storage.digests`: SHA-256, truncated to 16 bytes, per 64 KiB block; holes are
known to be zero without reading), compares with the hashes of the last shipped state, and
appends the blocks that differ to the open change-log segment — as WRITE records of exactly the
bytes it hashed, or ZERO records — just before the cut. The shipper then sends the cycle like
any other.

The digests live in ``<vm folder>/scan/<disk>.hashes``, replaced atomically once the scan's
records are durable in the log and before the cut (see :class:`ChangeScanner` for why that order
and the start-up rule make a crash anywhere safe). The initial replication records the digests
of exactly what it read, so the first scan after it sends only what changed since. Without a
hash file (it was lost, or the disk was resized) every block counts as changed: a full but
correct resend.

**Consistency.** On a live image a scan is *not* crash-consistent: blocks are read one after the
other while the guest keeps writing, so the cut can mix blocks from different instants (and a
block being written can be read half old, half new). Every change is still shipped by the next
scan, so the replica converges, but a recovery point taken from a scan cycle is only as good as
the image was still. The pre-cut hook (``fsfreeze --freeze``, ``virsh suspend``, ``virsh
domfsfreeze``) runs before the scan and the post-cut hook (thaw, resume) after it: with the
guest frozen or paused during the scan, the cut is crash-consistent (application-consistent
with fsfreeze, as far as the applications flushed). Hooks run through
:func:`vmreplica.storage.hooks.run_hook`, with its rules (``{vm}``, environment, timeout).

About 400 lines: the scan, its digests file and the hooks around it make one capture mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from vmreplica.errors import ChangeLogCorrupt, ScanStopped
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.changelog import SEGMENT_SUFFIX, read_segment
from vmreplica.storage.digests import DIGEST_BYTES, block_digest, data_block_ranges, zero_digest
from vmreplica.storage.image import DiskImage
from vmreplica.storage.safefile import replace_atomically

log = logging.getLogger(__name__)

SCAN_BLOCK_BYTES: Final = 64 * 1024
FEED_RECORD_BYTES: Final = 1024 * 1024
"""Consecutive changed blocks are appended as one change-log record of up to this size."""
_COMPARE_BLOCKS: Final = 4096
"""Hole stretches are compared against the zero digest this many blocks at a time."""
_MAGIC: Final = b"VMRSCAN1"
"""Names the digest scheme too (SHA-256/16 per block, short tail padded with zeros): a file
written under another scheme must carry another magic, so that it reads as unusable."""
_HEADER: Final = struct.Struct("<8sIQI")  # magic, block bytes, disk size, crc32 of the digests
_HEADER_CRC: Final = struct.Struct("<I")
INVALID_DIGEST: Final = b"\xff" * DIGEST_BYTES
"""Stands for "unknown": treated as different from any block's digest."""


def hashes_path(folder: Path, disk: str) -> Path:
    return folder / f"{disk}.hashes"


def load_hashes(path: Path, size: int, block_bytes: int = SCAN_BLOCK_BYTES) -> bytes | None:
    """The block digests saved for a disk of ``size`` bytes, or None if missing or unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    header_bytes = _HEADER.size + _HEADER_CRC.size
    if len(data) < header_bytes:
        return None
    magic, stored_block, stored_size, crc = _HEADER.unpack_from(data)
    (header_crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    digests = data[header_bytes:]
    count = -(-size // block_bytes)
    if (
        magic != _MAGIC
        or header_crc != zlib.crc32(data[: _HEADER.size])
        or (stored_block, stored_size) != (block_bytes, size)
        or len(digests) != count * DIGEST_BYTES
        or zlib.crc32(digests) != crc
    ):
        log.warning(
            "block hashes %s do not match the disk (or are damaged); the next scan "
            "sends every block",
            path,
        )
        return None
    return digests


def save_hashes(
    path: Path, size: int, digests: bytes | bytearray, block_bytes: int = SCAN_BLOCK_BYTES
) -> None:
    """Replace the hash file atomically (temporary file, fsync, rename, folder fsync)."""
    header = _HEADER.pack(_MAGIC, block_bytes, size, zlib.crc32(digests))

    def write(temporary: Path) -> None:
        with temporary.open("wb") as file:
            file.write(header + _HEADER_CRC.pack(zlib.crc32(header)))
            file.write(digests)

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, write)


@dataclass
class ScanResult:
    """What one scan found and fed; :meth:`ChangeScanner.commit` saves its digests."""

    digests: dict[str, bytearray] = field(default_factory=dict)
    blocks_changed: int = 0
    bytes_fed: int = 0
    """Bytes of WRITE records appended (changed blocks with data)."""
    bytes_zeroed: int = 0
    """Bytes of ZERO records appended (changed blocks now all zeros)."""
    bytes_read: int = 0
    seconds: float = 0.0


class _Feeder:
    """Merges consecutive changed blocks of one disk into change-log records."""

    def __init__(
        self, vm: CapturedVm, disk: int, result: ScanResult, stop: threading.Event
    ) -> None:
        self.vm = vm
        self.disk = disk
        self.result = result
        self.stop = stop
        self.zero_start = self.zero_end = -1
        self.data_start = -1
        self.data: list[bytes] = []
        self.data_bytes = 0

    def zero(self, offset: int, length: int) -> None:
        self._flush_data()
        if self.zero_end != offset:
            self._flush_zero()
            self.zero_start = offset
        self.zero_end = offset + length
        self.result.bytes_zeroed += length

    def write(self, offset: int, data: bytes) -> None:
        self._flush_zero()
        if self.data_start + self.data_bytes != offset or self.data_bytes >= FEED_RECORD_BYTES:
            self._flush_data()
            self.data_start = offset
        self.data.append(data)
        self.data_bytes += len(data)
        self.result.bytes_fed += len(data)

    def _flush_zero(self) -> None:
        if self.zero_end > self.zero_start >= 0:
            with self.vm.log_lock:
                if self.stop.is_set():
                    raise ScanStopped("scan cancelled")
                self.vm.log.zero(self.disk, self.zero_start, self.zero_end - self.zero_start)
        self.zero_start = self.zero_end = -1

    def _flush_data(self) -> None:
        if self.data:
            with self.vm.log_lock:
                if self.stop.is_set():
                    raise ScanStopped("scan cancelled")
                self.vm.log.write(self.disk, self.data_start, b"".join(self.data))
        self.data, self.data_bytes, self.data_start = [], 0, -1

    def close(self) -> None:
        self._flush_zero()
        self._flush_data()


class _SeedRecorder:
    """Digests of what the initial replication read, so they equal what the replica got.

    The seed reads allocated ranges in pieces that need not be block-aligned; a block read in
    several pieces is assembled first. Parts never read were holes, and are zeros on the
    replica too, as are the all-zero chunks the seed skips.
    """

    def __init__(self, size: int, block_bytes: int, zero: bytes) -> None:
        self.size = size
        self.block_bytes = block_bytes
        self.digests = bytearray(zero * -(-size // block_bytes))
        self._partial: dict[int, bytearray] = {}

    def observe(self, offset: int, data: bytes) -> None:
        block_bytes, view, done = self.block_bytes, memoryview(data), 0
        while done < len(data):
            number = (offset + done) // block_bytes
            start = number * block_bytes
            length = min(block_bytes, self.size - start)
            inside = offset + done - start
            take = min(length - inside, len(data) - done)
            if inside == 0 and take == length:
                self._set(number, block_digest(view[done : done + take], block_bytes))
            else:
                buffer = self._partial.setdefault(number, bytearray(length))
                buffer[inside : inside + take] = view[done : done + take]
            done += take

    def _set(self, number: int, digest: bytes) -> None:
        self.digests[number * DIGEST_BYTES : (number + 1) * DIGEST_BYTES] = digest

    def invalidate_below(self, offset: int) -> None:
        """Blocks before ``offset`` were sent by an earlier, interrupted run: unknown."""
        for number in range(-(-offset // self.block_bytes)):
            self._set(number, INVALID_DIGEST)

    def finish(self) -> bytearray:
        for number, buffer in self._partial.items():
            self._set(number, block_digest(buffer, self.block_bytes))
        self._partial.clear()
        return self.digests


class _ObservedImage(DiskImage):
    """A view of an open image whose reads are reported to a :class:`_SeedRecorder`."""

    def __init__(self, image: DiskImage, recorder: _SeedRecorder) -> None:
        super().__init__(image.path, image._fd, image.size)  # shares the descriptor
        self._recorder = recorder

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        self._recorder.observe(offset, data)
        return data

    def close(self) -> None:
        """The original image owns the descriptor."""


class ChangeScanner:
    """Finds what changed in a VM's images since the last shipped state, and logs it.

    A cycle: :meth:`scan` (appends changed blocks), ``vm.flush()`` (the log is durable), then
    :meth:`commit` (the digests become the saved state), then the cut. Saved digests therefore
    never claim more than the log holds. If a scan fails or is cancelled, or the agent
    restarts, the next scan first treats every block that an unshipped record touches as
    changed: the saved digests may lag behind those records, and a block changed back to its
    old content since must still be sent.
    """

    def __init__(self, vm: CapturedVm, folder: Path, block_bytes: int = SCAN_BLOCK_BYTES) -> None:
        self.vm = vm
        self.folder = folder
        self.block_bytes = block_bytes
        self._zero_digest = zero_digest(block_bytes)
        self._in_step = False
        """False when the saved digests may lag behind the log (start-up, failed scan)."""
        self._stop = threading.Event()

    @contextlib.asynccontextmanager
    async def recording_seed(self, resumed_at: Mapping[str, int]) -> AsyncIterator[None]:
        """Record the digests of what the initial replication reads, then save them.

        ``resumed_at`` gives, per disk, where an interrupted seed resumes: what came before
        was read by an earlier run and is sent again by the first scan.
        """
        vm = self.vm
        originals = list(vm.images)
        recorders = [
            _SeedRecorder(image.size, self.block_bytes, self._zero_digest) for image in originals
        ]
        for index, (name, recorder) in enumerate(zip(vm.disk_names, recorders, strict=True)):
            recorder.invalidate_below(resumed_at.get(name, 0))
            vm.images[index] = _ObservedImage(originals[index], recorder)
        try:
            yield
        finally:
            vm.images[:] = originals
        digests = {
            name: recorder.finish() for name, recorder in zip(vm.disk_names, recorders, strict=True)
        }
        await asyncio.to_thread(self._save, digests)
        self._in_step = True

    async def scan(self) -> ScanResult:
        """Compare every block with the saved digests; append changed ones to the open segment.

        Runs in a worker thread (reading and hashing a disk takes a while); nothing else may
        append to this VM's change log meanwhile. Cancelling stops the thread at its next block.
        """
        self._stop.clear()
        suspect = not self._in_step
        self._in_step = False
        work = asyncio.ensure_future(asyncio.to_thread(self._scan, True, suspect))
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            self._stop.set()  # the thread raises ScanStopped at its next append
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        if result.blocks_changed:
            self.vm.mark_unsynced()  # the caller's flush must make the fed records durable
        log.info(
            "VM %s: scan read %d bytes in %.2f s; %d blocks changed (%d bytes of data, %d zeroed)",
            self.vm.name,
            result.bytes_read,
            result.seconds,
            result.blocks_changed,
            result.bytes_fed,
            result.bytes_zeroed,
        )
        return result

    async def commit(self, result: ScanResult) -> None:
        """Save the scanned digests: call after ``vm.flush()`` and before the cut."""
        await asyncio.to_thread(self._save, result.digests)
        self._in_step = True

    def _save(self, digests: Mapping[str, bytearray]) -> None:
        for name, image in zip(self.vm.disk_names, self.vm.images, strict=True):
            save_hashes(hashes_path(self.folder, name), image.size, digests[name], self.block_bytes)

    def _unshipped_blocks(self) -> dict[int, set[int]] | None:
        """Blocks touched by records of unshipped segments; None if a segment is unreadable."""
        touched: dict[int, set[int]] = {}
        for path in sorted(self.vm.log.folder.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                segment = read_segment(path, repair=False)
            except ChangeLogCorrupt:
                return None
            for record in segment.records:
                first = record.offset // self.block_bytes
                last = (record.offset + max(record.length, 1) - 1) // self.block_bytes
                touched.setdefault(record.disk, set()).update(range(first, last + 1))
        return touched

    def _scan(self, feed: bool, suspect: bool) -> ScanResult:
        started = time.monotonic()
        result = ScanResult()
        touched = self._unshipped_blocks() if suspect else {}
        for index, (name, image) in enumerate(zip(self.vm.disk_names, self.vm.images, strict=True)):
            old = load_hashes(hashes_path(self.folder, name), image.size, self.block_bytes)
            if touched is None:
                old = None  # an unshipped segment is unreadable: send every block
            elif old is not None and touched.get(index):
                stale = bytearray(old)
                for number in touched[index]:
                    stale[number * DIGEST_BYTES : (number + 1) * DIGEST_BYTES] = INVALID_DIGEST
                old = bytes(stale[: len(old)])
            feeder = _Feeder(self.vm, index, result, self._stop) if feed else None
            result.digests[name] = self._scan_disk(image, old, feeder, result)
            if feeder is not None:
                feeder.close()
        result.seconds = time.monotonic() - started
        return result

    def _scan_disk(
        self, image: DiskImage, old: bytes | None, feeder: _Feeder | None, result: ScanResult
    ) -> bytearray:
        size, block = image.size, self.block_bytes
        count = -(-size // block)
        zero, width = self._zero_digest, DIGEST_BYTES
        digests = bytearray(zero * count)
        position = 0
        for first, end in [*data_block_ranges(image, block), (count, count)]:
            self._compare_holes(image, position, first, old, feeder, result)
            for number in range(first, end):
                offset = number * block
                data = image.read(offset, min(block, size - offset))
                result.bytes_read += len(data)
                digest = block_digest(data, block)
                digests[number * width : (number + 1) * width] = digest
                if old is not None and old[number * width : (number + 1) * width] == digest:
                    continue
                result.blocks_changed += 1
                if feeder is not None:
                    if digest == zero:
                        feeder.zero(offset, len(data))
                    else:
                        feeder.write(offset, data)
            position = end
        return digests

    def _compare_holes(
        self,
        image: DiskImage,
        first: int,
        end: int,
        old: bytes | None,
        feeder: _Feeder | None,
        result: ScanResult,
    ) -> None:
        """Blocks [first, end) are holes (zeros): log a ZERO for each that was not zero."""
        width, block, zero = DIGEST_BYTES, self.block_bytes, self._zero_digest
        for chunk in range(first, end, _COMPARE_BLOCKS):
            stop = min(end, chunk + _COMPARE_BLOCKS)
            if old is not None and old[chunk * width : stop * width] == zero * (stop - chunk):
                continue
            for number in range(chunk, stop):
                if old is not None and old[number * width : (number + 1) * width] == zero:
                    continue
                result.blocks_changed += 1
                if feeder is not None:
                    offset = number * block
                    feeder.zero(offset, min(block, image.size - offset))
