"""Which ranges of a VM's disks diverged between its old and its new primary.

After a failover both sites may have written: the old primary in cycles the new one never
applied (shipped or still in its change log), the new one since the epoch started. Reverse
replication sends only those ranges, and they are found here:

- :func:`journal_ranges`: what an epoch's cycles after a point wrote, read from the journal;
- :func:`changelog_ranges`: what a site's change log (and dirty-block map) holds that never
  shipped;
- :func:`report_divergence` (on the old primary) publishes its side on the status topic, as
  ResyncRequests of exact ranges, or, when its change log is lost, as DigestMaps of block
  digests (:mod:`vmreplica.storage.digests`);
- :func:`reported_ranges` (on the new primary) reads that report back, comparing any DigestMap
  block by block with its own disks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import DiskRecord, VmRecord
from vmreplica.errors import ChangeLogCorrupt, JournalIntegrityError
from vmreplica.failover.journal import journal_events
from vmreplica.journal.kafka import JournalReader, StatusPublisher
from vmreplica.producers.capture import DIRTY_BLOCK_BYTES, DIRTY_MAP_NAME, DirtyMap
from vmreplica.producers.changelog import RecordKind, read_segment
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status, encode
from vmreplica.schemas.events import ByteRange, DigestMap, EpochStart, ResyncRequest, WriteBatch
from vmreplica.storage.digests import differing_blocks, image_digests

DIGEST_BLOCK_BYTES_MIN: Final = 64 * 1024
"""Block size of a DigestMap for disks up to 16 GiB (:data:`DIGEST_BLOCKS_MAX` blocks)."""
DIGEST_BLOCKS_MAX: Final = 262_144
"""Blocks per DigestMap: keeps a record near 4 MiB; larger disks use larger blocks."""
MAX_RESYNC_RANGES: Final = 50_000
"""Ranges per ResyncRequest; beyond, neighbouring ranges are merged (more bytes, fewer ranges)."""
REPORT_WAIT_SECONDS: Final = 30.0
"""How long ``reverse`` waits for the old primary's report: its agent reports within moments of
seeing the new epoch, or, if it was fenced while running, when its worker is retried (30 s)."""
REPORT_FETCH_SECONDS: Final = 0.1
"""Longest a read of the status topic waits for a record before the report is checked again."""

Ranges = dict[str, IntervalSet]
"""Byte ranges per disk name."""


async def journal_ranges(site: Site, vm: str, epoch: int, after_cycle: int,
                         ranges: Ranges) -> None:
    """Add the ranges written by ``epoch``'s cycles after ``after_cycle`` to ``ranges``."""
    async for _, event in journal_events(site, vm):
        if isinstance(event, WriteBatch) and event.epoch == epoch and event.cycle > after_cycle:
            for extent in event.extents:
                ranges.setdefault(extent.disk, IntervalSet()).add(
                    extent.offset, extent.offset + extent.length)


def changelog_ranges(folder: Path, disks: Sequence[DiskRecord], ranges: Ranges) -> None:
    """Add what a site wrote that never shipped to ``ranges``: every record of the change-log
    segments under ``folder``, and the blocks of its dirty-block map (writes of a cycle that
    outgrew the change-log budget reach the image only and are marked there, so a site killed
    in such a cycle has them nowhere else).

    :raises ChangeLogCorrupt: a segment or the dirty-block map cannot be read.
    """
    names = [d.name for d in disks]
    for path in sorted(folder.glob("*.hrl")):
        for entry in read_segment(path, repair=True).records:
            if entry.kind in (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM):
                ranges.setdefault(names[entry.disk], IntervalSet()).add(
                    entry.offset, entry.offset + entry.length)
    try:
        dirty = DirtyMap.load(folder / DIRTY_MAP_NAME)
    except JournalIntegrityError as error:
        raise ChangeLogCorrupt(str(error)) from error
    for index, block in dirty or ():
        if index >= len(disks):
            raise ChangeLogCorrupt(f"dirty-block map {folder / DIRTY_MAP_NAME} names disk "
                                   f"{index}; the VM has {len(disks)}")
        start = block * DIRTY_BLOCK_BYTES
        end = min(start + DIRTY_BLOCK_BYTES, disks[index].size_bytes)
        if start < end:
            ranges.setdefault(names[index], IntervalSet()).add(start, end)


def digest_block_bytes(size: int) -> int:
    """The block size of a disk's DigestMap: 64 KiB, doubled until the map stays small."""
    block = DIGEST_BLOCK_BYTES_MIN
    while size / block > DIGEST_BLOCKS_MAX:
        block *= 2
    return block


def byte_ranges(ranges: IntervalSet) -> tuple[ByteRange, ...]:
    """``ranges`` as a ResyncRequest carries them: at most :data:`MAX_RESYNC_RANGES`."""
    pairs = list(zip(ranges.starts, ranges.ends, strict=True))
    while len(pairs) > MAX_RESYNC_RANGES:
        pairs = [(pairs[i][0], pairs[min(i + 1, len(pairs) - 1)][1])
                 for i in range(0, len(pairs), 2)]
    return tuple(ByteRange(start, end - start) for start, end in pairs)


async def report_divergence(site: Site, record: VmRecord, start: EpochStart,
                            diverged: Ranges | None) -> None:
    """Tell the new primary of ``start`` what this old primary wrote after its starting point.

    ``diverged`` known: one ResyncRequest per disk, with no range for a disk that did not
    diverge, so the new primary knows the report is complete once it holds one per disk.
    Unknown (the change log is lost): a DigestMap of every disk, for the new primary to
    compare with its own.
    """
    vm, point = record.name, start.start_cycle - 1
    status = StatusPublisher(site.connection)
    await status.start()
    try:
        for image in record.disks:
            event: ResyncRequest | DigestMap
            if diverged is not None:
                event = ResyncRequest(
                    vm, start.epoch, site.config.site, f"diverged after cycle {point}",
                    image.name, byte_ranges(diverged.get(image.name, IntervalSet())), now_ms())
            else:
                block = digest_block_bytes(image.size_bytes)
                event = DigestMap(vm, start.epoch, site.config.site, image.name, point,
                                  block, image_digests(image.path, block))
            await status.publish(site.status_topic(vm), vm.encode(), encode(event))
    finally:
        await status.stop()


async def reported_ranges(site: Site, record: VmRecord, replica_site: str,
                          wait_seconds: float = 0.0) -> Ranges | None:
    """Ranges the returning old primary reported for this epoch: as ResyncRequests, or else
    as DigestMaps compared block by block with this site's disks; None when it sent neither.

    Waits up to ``wait_seconds`` for a report of every disk: an old primary's agent reports
    within moments of seeing the new epoch, so a ``reverse`` run just after it started finds
    the report instead of missing it. Reading blocks on the broker (a fetch that returns as
    soon as a record arrives), never spins.
    """
    vm, epoch = record.name, record.epoch
    disks = {d.name for d in record.disks}
    requests: Ranges = {}
    maps: dict[str, DigestMap] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    async with JournalReader(site.connection, site.status_topic(vm)) as reader:
        while True:
            for message in await reader.fetch(REPORT_FETCH_SECONDS):
                event = decode_status(message.value)
                if event.site != replica_site or event.epoch != epoch:
                    continue
                if isinstance(event, ResyncRequest):
                    ranges = requests.setdefault(event.disk or "", IntervalSet())
                    for byte_range in event.ranges:
                        ranges.add(byte_range.offset, byte_range.offset + byte_range.length)
                elif isinstance(event, DigestMap):
                    maps[event.disk] = event
            if "" in requests or disks <= set(requests) or disks <= set(maps):
                break  # a complete report: one per disk, or one for every disk
            if (loop.time() >= deadline
                    and await reader.position() >= await reader.end_offset()):
                break  # what arrived in time (an older agent reports diverged disks only)
    if requests:
        return requests
    if not maps:
        return None
    found: Ranges = {}
    for disk in record.disks:
        theirs = maps.get(disk.name)
        if theirs is None:
            continue
        ours = image_digests(disk.path, theirs.block_size)
        ranges = found.setdefault(disk.name, IntervalSet())
        for number in differing_blocks(ours, theirs.digests):
            start = number * theirs.block_size
            ranges.add(start, min(start + theirs.block_size, disk.size_bytes))
    return found
