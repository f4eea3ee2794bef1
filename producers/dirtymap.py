"""The dirty-block map: which blocks a VM wrote while its change log was over budget.

When the open change-log segment outgrows its budget (:mod:`vmreplica.producers.capture`), writes
go to the image only and their :data:`DIRTY_BLOCK_BYTES` blocks are marked here; at the cut the
marked blocks are copied from the image into the segment, so the cycle still ships whole. The
map is kept as crash-safe as the log: a mark reaches ``dirty.map`` *before* the image is written,
and FLUSH fsyncs the map before the images, so after a crash redo knows which blocks' image
content is newer than the log.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from vmreplica.errors import JournalIntegrityError
from vmreplica.storage.safefile import create_for_append, fsync_directory

DIRTY_BLOCK_BYTES: Final = 64 * 1024
"""Granularity of the dirty-block map: what one write marks and what the cut copies."""
DIRTY_RUN_BLOCKS: Final = 16
"""Consecutive dirty blocks copied into one change-log record at the cut (1 MiB)."""
DIRTY_MAP_NAME: Final = "dirty.map"

_DIRTY_MAGIC: Final = b"VMRDIRT1"
_DIRTY_HEADER: Final = struct.Struct("<8sQI")  # magic, cycle, block bytes
_DIRTY_ENTRY: Final = struct.Struct("<HQ")  # disk index, block number
_CRC: Final = struct.Struct("<I")
_DIRTY_HEADER_BYTES: Final = _DIRTY_HEADER.size + _CRC.size
_DIRTY_ENTRY_BYTES: Final = _DIRTY_ENTRY.size + _CRC.size


class DirtyMap:
    """Blocks written while the change log was over budget: in memory and in ``dirty.map``.

    File: a header (magic, cycle, block size, crc32) then one entry per newly dirty block (disk
    index, block number, crc32 of both), appended with one ``write`` each. A torn or damaged tail
    is ignored on load; the entries before it are kept.
    """

    def __init__(self, path: Path, cycle: int, block_bytes: int = DIRTY_BLOCK_BYTES) -> None:
        self.path = path
        self.block_bytes = block_bytes
        self.cycle = cycle
        self.blocks: dict[int, set[int]] = {}
        self.copied: dict[int, set[int]] = {}
        """Dirty blocks already copied into the segment by ``prepare_cut`` and not written since."""
        self.copied_bytes = 0
        """Bytes of dirty blocks copied into the segment so far this cycle."""
        self._sorted: dict[int, list[int]] | None = None
        self._fd = -1

    @classmethod
    def create(
        cls,
        path: Path,
        cycle: int,
        blocks: Iterable[tuple[int, int]] = (),
        block_bytes: int = DIRTY_BLOCK_BYTES,
    ) -> DirtyMap:
        """A new map file (replacing any), holding ``blocks``; its folder entry is fsynced."""
        dirty = cls(path, cycle, block_bytes)
        header = _DIRTY_HEADER.pack(_DIRTY_MAGIC, cycle, block_bytes)
        entries = bytearray(header + _CRC.pack(zlib.crc32(header)))
        for disk, block in blocks:
            if dirty._add(disk, block):
                entries += dirty._entry(disk, block)
        dirty._fd = create_for_append(path, (entries,))
        return dirty

    @staticmethod
    def load(path: Path) -> list[tuple[int, int]] | None:
        """The (disk, block) entries of an existing map file, or None if there is none."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _DIRTY_HEADER_BYTES:
            return []
        magic, _, block_bytes = _DIRTY_HEADER.unpack_from(data)
        (crc,) = _CRC.unpack_from(data, _DIRTY_HEADER.size)
        if (
            magic != _DIRTY_MAGIC
            or crc != zlib.crc32(data[: _DIRTY_HEADER.size])
            or block_bytes != DIRTY_BLOCK_BYTES
        ):
            raise JournalIntegrityError(
                f"dirty-block map {path} has a damaged header, so the blocks written while the "
                "change log was over budget are unknown. Operator action: seed the VM's replica "
                "again (a full initial replication); this map cannot tell which blocks to send."
            )
        entries = []
        position = _DIRTY_HEADER_BYTES
        while position + _DIRTY_ENTRY_BYTES <= len(data):
            body = data[position : position + _DIRTY_ENTRY.size]
            (crc,) = _CRC.unpack_from(data, position + _DIRTY_ENTRY.size)
            if crc != zlib.crc32(body):
                break
            entries.append(_DIRTY_ENTRY.unpack(body))
            position += _DIRTY_ENTRY_BYTES
        return entries

    @staticmethod
    def _entry(disk: int, block: int) -> bytes:
        body = _DIRTY_ENTRY.pack(disk, block)
        return body + _CRC.pack(zlib.crc32(body))

    def _add(self, disk: int, block: int) -> bool:
        blocks = self.blocks.setdefault(disk, set())
        if block in blocks:
            return False
        blocks.add(block)
        self._sorted = None
        return True

    def _block_range(self, offset: int, length: int) -> range:
        size = self.block_bytes
        return range(offset // size, (offset + max(length, 1) - 1) // size + 1)

    def mark(self, disk: int, offset: int, length: int) -> None:
        """Mark the blocks of a range dirty; new marks reach the file before this returns."""
        blocks = self._block_range(offset, length)
        new = [self._entry(disk, block) for block in blocks if self._add(disk, block)]
        if new:
            os.write(self._fd, b"".join(new))

    def uncopy(self, disk: int, offset: int, length: int) -> None:
        """A range changed: copies ``prepare_cut`` took of its blocks are stale.

        Called *after* the image is changed: a copy taken before is then discarded here, and
        one recorded after this reads the new content.
        """
        copied = self.copied.get(disk)
        if not copied:
            return
        blocks = self._block_range(offset, length)
        if len(blocks) <= len(copied):
            copied.difference_update(blocks)
        else:
            copied.difference_update([b for b in copied if b in blocks])

    @property
    def block_count(self) -> int:
        return sum(len(blocks) for blocks in self.blocks.values())

    def sorted_blocks(self, disk: int) -> list[int]:
        if self._sorted is None:
            self._sorted = {d: sorted(b) for d, b in self.blocks.items()}
        return self._sorted.get(disk, [])

    def clean_ranges(self, disk: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The parts of a range outside every dirty block, as (offset, length)."""
        blocks = self.sorted_blocks(disk)
        size = self.block_bytes
        end = offset + length
        position = offset
        index = bisect.bisect_left(blocks, offset // size)
        while position < end:
            if index >= len(blocks) or blocks[index] * size >= end:
                yield position, end - position
                return
            dirty_start = blocks[index] * size
            if dirty_start > position:
                yield position, dirty_start - position
            position = max(position, dirty_start + size)
            index += 1

    def runs(self, disk: int, skip_copied: bool = True) -> Iterator[tuple[int, int]]:
        """(first block, count) runs of consecutive dirty blocks, at most DIRTY_RUN_BLOCKS long.

        With ``skip_copied``, blocks that ``prepare_cut`` copied (and nobody wrote since) are
        left out.
        """
        blocks = self.sorted_blocks(disk)
        copied = self.copied.get(disk)
        if skip_copied and copied:
            blocks = [b for b in blocks if b not in copied]
        index = 0
        while index < len(blocks):
            first = blocks[index]
            count = 1
            while (
                index + count < len(blocks)
                and count < DIRTY_RUN_BLOCKS
                and blocks[index + count] == first + count
            ):
                count += 1
            yield first, count
            index += count

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def dup_fd(self) -> int:
        return os.dup(self._fd) if self._fd >= 0 else -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Forget the map: its blocks are in a sealed (fsynced) segment now."""
        self.close()
        self.path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)
