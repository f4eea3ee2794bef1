"""Which ranges of a VM's disks diverged between its old and its new primary.

After a failover both sites may have written: the old primary in cycles the new one never
applied (shipped or still in its change log), the new one since the epoch started. Reverse
replication sends only those ranges, and they are found here:

- :func:`journal_ranges`: what an epoch's cycles after a point wrote, read from the journal;
- :func:`changelog_ranges`: what a site's change log holds that never shipped;
- :func:`report_divergence` (on the old primary) publishes its side on the status topic, as
  ResyncRequests of exact ranges, or, when its change log is lost, as DigestMaps of block
  digests (:mod:`vmreplica.storage.digests`);
- :func:`reported_ranges` (on the new primary) reads that report back, comparing any DigestMap
  block by block with its own disks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import VmRecord
from vmreplica.failover.journal import journal_events
from vmreplica.journal.kafka import StatusPublisher, read_to_end
from vmreplica.producers.changelog import RecordKind, read_segment
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_status, encode
from vmreplica.schemas.events import ByteRange, DigestMap, EpochStart, ResyncRequest, WriteBatch
from vmreplica.schemas.validation import check_digest_map_fits
from vmreplica.storage.digests import differing_blocks, image_digests

DIGEST_BLOCK_BYTES_MIN: Final = 64 * 1024
"""Block size of a DigestMap for disks up to 16 GiB (:data:`DIGEST_BLOCKS_MAX` blocks)."""
DIGEST_BLOCKS_MAX: Final = 262_144
"""Blocks per DigestMap: keeps a record near 4 MiB; larger disks use larger blocks."""
MAX_RESYNC_RANGES: Final = 50_000
"""Ranges per ResyncRequest; beyond, neighbouring ranges are merged (more bytes, fewer ranges)."""

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


def changelog_ranges(folder: Path, disks: list[str], ranges: Ranges) -> None:
    """Add the ranges written in the unshipped change-log segments under ``folder``.

    :raises ChangeLogCorrupt: a segment cannot be read.
    """
    for path in sorted(folder.glob("*.hrl")):
        for entry in read_segment(path, repair=True).records:
            if entry.kind in (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM):
                ranges.setdefault(disks[entry.disk], IntervalSet()).add(
                    entry.offset, entry.offset + entry.length)


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

    ``diverged`` known: one ResyncRequest per disk (at least one, maybe empty, so the new
    primary knows the report is complete). Unknown (the change log is lost): a DigestMap of
    every disk, for the new primary to compare with its own.
    """
    vm, point = record.name, start.start_cycle - 1
    status = StatusPublisher(site.connection)
    await status.start()
    try:
        if diverged is not None:
            for disk, ranges in sorted(diverged.items()) or [(record.disks[0].name,
                                                              IntervalSet())]:
                event: ResyncRequest | DigestMap = ResyncRequest(
                    vm, start.epoch, site.config.site, f"diverged after cycle {point}",
                    disk, byte_ranges(ranges), now_ms())
                await status.publish(site.status_topic(vm), vm.encode(), encode(event))
        else:
            for image in record.disks:
                block = digest_block_bytes(image.size_bytes)
                event = DigestMap(vm, start.epoch, site.config.site, image.name, point,
                                  block, image_digests(image.path, block))
                await status.publish(site.status_topic(vm), vm.encode(), encode(event))
    finally:
        await status.stop()


async def reported_ranges(site: Site, record: VmRecord, replica_site: str) -> Ranges | None:
    """Ranges the returning old primary reported for this epoch: as ResyncRequests, or else
    as DigestMaps compared block by block with this site's disks; None when it sent neither."""
    vm, epoch = record.name, record.epoch
    found: Ranges | None = None
    maps: dict[str, DigestMap] = {}
    async for message in read_to_end(site.connection, site.status_topic(vm)):
        event = decode_status(message.value)
        if event.site != replica_site or event.epoch != epoch:
            continue
        if isinstance(event, ResyncRequest):
            found = found if found is not None else {}
            ranges = found.setdefault(event.disk or "", IntervalSet())
            for byte_range in event.ranges:
                ranges.add(byte_range.offset, byte_range.offset + byte_range.length)
        elif isinstance(event, DigestMap):
            maps[event.disk] = event
    if found is None and maps:
        found = {}
        for disk in record.disks:
            theirs = maps.get(disk.name)
            if theirs is None:
                continue
            check_digest_map_fits(theirs, disk.size_bytes)  # not 16 bytes per byte of disk
            ours = image_digests(disk.path, theirs.block_size)
            ranges = found.setdefault(disk.name, IntervalSet())
            for number in differing_blocks(ours, theirs.digests):
                start = number * theirs.block_size
                ranges.add(start, min(start + theirs.block_size, disk.size_bytes))
    return found
