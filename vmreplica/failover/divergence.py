"""Which ranges of a VM's disks differ between two sites, and how a site reports its side.

Reverse replication (after a failover both sites may have written) and resynchronization (a
replica that diverged from its primary) send only those ranges, found here:

- :func:`journal_ranges`: what cycles after a point wrote, read from the journal;
- :func:`changelog_ranges`: what a site's change log (and dirty-block map) holds that never
  shipped;
- :func:`differing_ranges`: the blocks whose digests (a DigestMap from the other site, checked
  against the disk's size first) differ from this site's (:mod:`vmreplica.storage.digests`);
- :func:`report_divergence` (on the old primary) publishes its side on the status topic, as
  ResyncRequests of exact ranges, or, when its change log is lost, as DigestMaps of block
  digests;
- :func:`reported_ranges` (on the new primary) reads that report back, comparing any DigestMap
  block by block with its own disks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from vmreplica.consumers.replica import digest_maps
from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import DiskRecord, VmRecord
from vmreplica.errors import ChangeLogCorrupt, JournalIntegrityError, ResyncRefused
from vmreplica.failover.journal import journal_events
from vmreplica.journal.kafka import JournalReader, StatusPublisher
from vmreplica.producers.changelog import RecordKind, read_segment
from vmreplica.producers.dirtymap import DIRTY_BLOCK_BYTES, DIRTY_MAP_NAME, DirtyMap
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import (
    ByteRange,
    CycleCommit,
    DigestMap,
    EpochStart,
    ResyncRequest,
    WriteBatch,
)
from vmreplica.schemas.validation import MAX_DIGEST_BLOCK_BYTES, MIN_DIGEST_BLOCK_BYTES
from vmreplica.storage.digests import (
    DIGEST_BYTES,
    differing_blocks,
    digest_count,
    image_digests,
)

MAX_RESYNC_RANGES: Final = 50_000
"""Ranges per ResyncRequest; beyond, neighbouring ranges are merged (more bytes, fewer ranges)."""
DIGEST_BLOCK_BYTES_RANGE: Final = (MIN_DIGEST_BLOCK_BYTES, MAX_DIGEST_BLOCK_BYTES)
"""Smallest and largest block a DigestMap may use (the record's own bounds)."""
REPORT_WAIT_SECONDS: Final = 30.0
"""How long ``reverse`` waits for the old primary's report: its agent reports within moments of
seeing the new epoch, or, if it was fenced while running, when its worker is retried (30 s)."""
REPORT_FETCH_SECONDS: Final = 0.1
"""Longest a read of the status topic waits for a record before the report is checked again."""

Ranges = dict[str, IntervalSet]
"""Byte ranges per disk name."""


async def journal_ranges(
    site: Site,
    vm: str,
    after_cycle: int,
    ranges: Ranges,
    *,
    epoch: int | None = None,
    min_epoch: int = 0,
    start: int = 0,
    committed: set[int] | None = None,
) -> int:
    """Add the ranges written by cycles numbered after ``after_cycle`` to ``ranges``: of
    ``epoch`` only, or of every epoch from ``min_epoch`` on, reading the journal from offset
    ``start`` to its end. Returns the offset to read from next time; ``committed`` collects
    the numbers of those cycles whose commit the journal holds."""
    next_offset = start
    async for offset, event in journal_events(site, vm, start):
        next_offset = offset + 1
        if (
            committed is not None
            and isinstance(event, CycleCommit)
            and event.cycle > after_cycle
            and (event.epoch == epoch if epoch is not None else event.epoch >= min_epoch)
        ):
            committed.add(event.cycle)
        if (
            isinstance(event, WriteBatch)
            and event.cycle > after_cycle
            and (event.epoch == epoch if epoch is not None else event.epoch >= min_epoch)
        ):
            for extent in event.extents:
                ranges.setdefault(extent.disk, IntervalSet()).add(
                    extent.offset, extent.offset + extent.length
                )
    return next_offset


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
                    entry.offset, entry.offset + entry.length
                )
    try:
        dirty = DirtyMap.load(folder / DIRTY_MAP_NAME)
    except JournalIntegrityError as error:
        raise ChangeLogCorrupt(str(error)) from error
    for index, block in dirty or ():
        if index >= len(disks):
            raise ChangeLogCorrupt(
                f"dirty-block map {folder / DIRTY_MAP_NAME} names disk "
                f"{index}; the VM has {len(disks)}"
            )
        start = block * DIRTY_BLOCK_BYTES
        end = min(start + DIRTY_BLOCK_BYTES, disks[index].size_bytes)
        if start < end:
            ranges.setdefault(names[index], IntervalSet()).add(start, end)


def byte_ranges(ranges: IntervalSet) -> tuple[ByteRange, ...]:
    """``ranges`` as a ResyncRequest carries them: at most :data:`MAX_RESYNC_RANGES`."""
    pairs = list(zip(ranges.starts, ranges.ends, strict=True))
    while len(pairs) > MAX_RESYNC_RANGES:
        pairs = [
            (pairs[i][0], pairs[min(i + 1, len(pairs) - 1)][1]) for i in range(0, len(pairs), 2)
        ]
    return tuple(ByteRange(start, end - start) for start, end in pairs)


def check_digest_map(vm: str, disk: DiskRecord, theirs: DigestMap) -> None:
    """A DigestMap fits ``disk``: a sane block size, and exactly one digest per block.

    :raises ResyncRefused: it does not (a disk of another size there, a damaged record);
        nothing may be sent from it.
    """
    low, high = DIGEST_BLOCK_BYTES_RANGE
    where = (
        f"VM {vm!r}: the block digests of disk {disk.name!r} from site {theirs.site} "
        f"(cycle {theirs.cycle})"
    )
    if not low <= theirs.block_size <= high or theirs.block_size % low:
        raise ResyncRefused(
            f"{where} use blocks of {theirs.block_size} bytes, not a multiple of {low} up to "
            f"{high}; they were refused and nothing was sent. Operator action: check that "
            f"both sites run the same vmreplica release, then resync again"
        )
    expected = digest_count(disk.size_bytes, theirs.block_size)
    if len(theirs.digests) != expected * DIGEST_BYTES:
        count = f"{len(theirs.digests) / DIGEST_BYTES:g}"
        raise ResyncRefused(
            f"{where} hold {len(theirs.digests)} bytes ({count} digests of {DIGEST_BYTES} "
            f"bytes) but a disk of {disk.size_bytes} bytes in blocks of {theirs.block_size} "
            f"needs {expected}; they were refused and nothing was sent. Operator action: "
            f"check that the disk has the same size on both sites (a resize that did not "
            f"replicate), then resync again"
        )


def differing_ranges(
    vm: str, disk: DiskRecord, theirs: DigestMap, progress: Callable[[int], None] | None = None
) -> IntervalSet:
    """The blocks of ``disk`` (this site's image) whose digests differ from ``theirs``.

    Reads every allocated block of the image: run it off the event loop. ``progress`` gets the
    bytes examined so far, now and then.

    :raises ResyncRefused: ``theirs`` does not fit the disk (:func:`check_digest_map`).
    """
    check_digest_map(vm, disk, theirs)
    ours = image_digests(disk.path, theirs.block_size, progress)
    ranges = IntervalSet()
    for number in differing_blocks(ours, theirs.digests):
        start = number * theirs.block_size
        ranges.add(start, min(start + theirs.block_size, disk.size_bytes))
    return ranges


async def report_divergence(
    site: Site, record: VmRecord, start: EpochStart, diverged: Ranges | None
) -> None:
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
        events: list[ResyncRequest | DigestMap]
        if diverged is not None:
            events = [
                ResyncRequest(
                    vm,
                    start.epoch,
                    site.config.site,
                    f"diverged after cycle {point}",
                    disk.name,
                    byte_ranges(diverged.get(disk.name, IntervalSet())),
                    now_ms(),
                )
                for disk in record.disks
            ]
        else:
            events = list(
                digest_maps(
                    vm,
                    start.epoch,
                    site.config.site,
                    point,
                    [(d.name, Path(d.path), d.size_bytes) for d in record.disks],
                )
            )
        for event in events:
            await status.publish(site.status_topic(vm), vm.encode(), site.key.encode(event))
    finally:
        await status.stop()


async def reported_ranges(
    site: Site, record: VmRecord, replica_site: str, wait_seconds: float = 0.0
) -> Ranges | None:
    """Ranges the returning old primary reported for this epoch: as ResyncRequests, or else
    as DigestMaps compared block by block with this site's disks; None when it sent neither.

    Waits up to ``wait_seconds`` for a report of every disk: an old primary's agent reports
    within moments of seeing the new epoch, so a ``reverse`` run just after it started finds
    the report instead of missing it. Reading blocks on the broker (a fetch that returns as
    soon as a record arrives), never spins. A ResyncRequest naming no disk is a replica asking
    to be resynchronized, not a report.

    :raises ResyncRefused: a DigestMap does not fit its disk.
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
                event = await site.trusted_status(vm, message.offset, message.value)
                if event is None or event.site != replica_site or event.epoch != epoch:
                    continue
                if isinstance(event, ResyncRequest) and event.disk is not None:
                    ranges = requests.setdefault(event.disk, IntervalSet())
                    for byte_range in event.ranges:
                        ranges.add(byte_range.offset, byte_range.offset + byte_range.length)
                elif isinstance(event, DigestMap):
                    maps[event.disk] = event
            if disks <= set(requests) or disks <= set(maps):
                break  # a complete report: one per disk
            if loop.time() >= deadline and await reader.position() >= await reader.end_offset():
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
        found[disk.name] = differing_ranges(vm, disk, theirs)
    return found
