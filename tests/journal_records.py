"""Valid journal records built by hand, for tests of the rules a replica checks.

A cycle is one or more :class:`WriteBatch` records followed by its :class:`CycleCommit`, whose
hash chains to the previous cycle — what the shipper publishes as one Kafka transaction. Tests
build a valid cycle here and then break exactly one thing in it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import zstandard

from vmreplica.schemas.chain import cycle_hash
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import (
    Compression,
    Consistency,
    CycleCommit,
    DiskSize,
    Extent,
    ExtentKind,
    WriteBatch,
)


@dataclass(frozen=True)
class Change:
    """One extent of a batch: ``data`` for DATA, ``length`` alone for ZERO and TRIM."""

    disk: str
    offset: int
    data: bytes = b""
    kind: ExtentKind = ExtentKind.DATA
    length: int = 0

    @property
    def size(self) -> int:
        return len(self.data) if self.kind is ExtentKind.DATA else self.length


def write_batch(
    vm: str,
    epoch: int,
    cycle: int,
    index: int,
    changes: Sequence[Change],
    compression: Compression = Compression.NONE,
) -> WriteBatch:
    """Batch ``index`` of a cycle: DATA extents packed back to back into the payload."""
    extents, payload = [], bytearray()
    for change in changes:
        if change.kind is ExtentKind.DATA:
            extents.append(
                Extent(
                    change.disk,
                    change.offset,
                    len(change.data),
                    change.kind,
                    len(payload),
                    zlib.crc32(change.data),
                )
            )
            payload += change.data
        else:
            extents.append(Extent(change.disk, change.offset, change.length, change.kind, 0, 0))
    body = bytes(payload)
    if compression is Compression.ZSTD:
        body = zstandard.ZstdCompressor().compress(body)
    return WriteBatch(vm, epoch, cycle, index, tuple(extents), compression, body)


def cycle_commit(
    vm: str,
    epoch: int,
    cycle: int,
    batches: Sequence[WriteBatch],
    previous_hash: bytes,
    disks: Mapping[str, int],
) -> CycleCommit:
    """The commit that closes ``batches``, chained to ``previous_hash``."""
    extents = [extent for batch in batches for extent in batch.extents]
    return CycleCommit(
        vm=vm,
        epoch=epoch,
        cycle=cycle,
        started_at_ms=1_000,
        cut_at_ms=2_000,
        batches=len(batches),
        extents=len(extents),
        bytes_written=sum(extent.length for extent in extents),
        payload_bytes=sum(len(batch.payload) for batch in batches),
        consistency=Consistency.CRASH,
        disks=tuple(DiskSize(name, size) for name, size in disks.items()),
        previous_hash=previous_hash,
        cycle_hash=cycle_hash(previous_hash, epoch, cycle, extents),
    )


def forged_gap(vm: str, cycle: int, previous: bytes, disks: Mapping[str, int]) -> list[bytes]:
    """A transaction claiming cycle ``cycle + 1`` while the replica expects ``cycle``: a journal
    violation (a gap) that only a resync repairs."""
    batch = write_batch(vm, 1, cycle + 1, 0, [Change("disk0", 0, b"\x5a" * 8192)])
    return [encode(batch), encode(cycle_commit(vm, 1, cycle + 1, [batch], previous, disks))]


HASHED_FIELDS = ("disk", "offset", "length", "kind", "crc32")
"""The fields of an extent the cycle hash covers (``payload_offset`` is checked by the CRC)."""


def alter(extent: Extent, field: str, other_disk: str) -> Extent:
    """``extent`` with one hashed field changed, as a forger or a bit flip would."""
    if field == "disk":
        return replace(extent, disk=other_disk)
    if field == "offset":
        return replace(extent, offset=extent.offset + 1)
    if field == "length":
        return replace(extent, length=extent.length + 1)
    if field == "kind":
        return replace(
            extent, kind=ExtentKind.ZERO if extent.kind is ExtentKind.DATA else ExtentKind.DATA
        )
    if field == "crc32":
        return replace(extent, crc32=extent.crc32 ^ 1)
    raise ValueError(f"{field!r} is not one of {HASHED_FIELDS}")
