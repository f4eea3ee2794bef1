"""Failover: the one place that drives both roles of a VM and swaps them.

Every action here needs the VM to itself (no worker of the agent running it) and is written to be
re-run after a crash: epochs only move forward, images are rolled back from undo logs that are
deleted last, and the catalog switches role in one transaction.

- :func:`prepare_planned` (primary): refuse writes, ship the final cycle, publish FailoverPrepared.
- :func:`promote` (replica): start a new epoch as primary — after a prepared planned failover
  (no data loss, hash chain checked) or unplanned at a chosen recovery point (images rolled back).
  Publishing the EpochStart initialises the VM's shared ``transactional_id``, so the broker fences
  the old primary's producer at that moment.
- :func:`complete` / :func:`cancel` (after an unplanned failover): keep the chosen point and prune
  the rest, or go back to being a replica and replay forward from the journal.
- :func:`demote` (old primary that sees a newer epoch): stop being primary, tell the new primary
  which ranges it wrote that never reached it, and wait to be resynchronised.
- :func:`reverse` (new primary): make the old primary its replica by sending one cycle with the
  ranges that diverged on either side — not a full copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from vmreplica.consumers.points import choose_point
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import Position, Rewind, VmRecord
from vmreplica.domain.names import transactional_id
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import (
    ChangeLogCorrupt,
    ConfigurationError,
    FailoverRefused,
    JournalIntegrityError,
)
from vmreplica.journal.kafka import JournalPublisher, StatusPublisher, read_to_end
from vmreplica.producers.changelog import RecordKind, read_segment
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import decode_journal, decode_status, encode
from vmreplica.schemas.events import (
    ByteRange,
    DigestMap,
    DiskDigest,
    EpochStart,
    FailoverPrepared,
    JournalEvent,
    ResyncRequest,
    WriteBatch,
)
from vmreplica.storage.image import DiskImage, sha256_of

AGENT_ALIVE_SECONDS: Final = 10.0
"""An agent that updated its catalog row more recently than this is taken to be running."""
HEARTBEAT_GRACE_SECONDS: Final = 15.0
"""An unplanned failover is refused while the primary heartbeated more recently than this."""
DIGEST_BYTES: Final = 16
"""blake2b digest size per block for the block-compare fallback."""
DIGEST_BLOCKS_MAX: Final = 262_144
"""Blocks per DigestMap: keeps a record near 4 MiB; larger disks use larger blocks."""
MAX_RESYNC_RANGES: Final = 50_000
"""Ranges per ResyncRequest; beyond, neighbouring ranges are merged (more bytes, fewer ranges)."""


@dataclass(frozen=True)
class ReverseResult:
    """What a reverse cost: the diverged bytes on both sides, and the bytes actually sent."""

    diverged_bytes: int
    sent_bytes: int
    cycle: int
    full_copy: bool


async def journal_events(site: Site, vm: str, start: int = 0,
                         ) -> AsyncIterator[tuple[int, JournalEvent]]:
    """Every committed journal event of ``vm`` from offset ``start`` to the current end."""
    async for record in read_to_end(site.connection, site.journal_topic(vm), start):
        yield record.offset, decode_journal(record.value)


async def newest_epoch(site: Site, vm: str, start: int) -> tuple[int, EpochStart] | None:
    """The last EpochStart in the journal from ``start`` on, with its offset."""
    found = None
    async for offset, event in journal_events(site, vm, start):
        if isinstance(event, EpochStart):
            found = (offset, event)
    return found


async def _publish_epoch(site: Site, record: VmRecord, start: EpochStart) -> int:
    """Publish an EpochStart with the VM's shared transactional id (fencing the old primary)."""
    publisher = JournalPublisher(site.connection, transactional_id(
        record.name, site.config.trust_group, site.config.topic_prefix))
    async with publisher:
        offsets = await publisher.publish(site.journal_topic(record.name),
                                          record.name.encode(), [encode(start)])
    return offsets[-1]


async def prepare_planned(site: Site, vm: str, reverse: bool = False,
                          start_vm: bool = False, verify: bool = False) -> FailoverPrepared:
    """Planned failover, on the primary: ship the final cycle and mark the VM prepared.

    The VM must already be stopped (the hypervisor adapter does that): writes are refused from
    here on. The replica takes over once it has applied the final cycle.
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary" or record.state is not ReplicationState.REPLICATING:
        raise FailoverRefused(f"VM {vm!r} is {record.role} here in state "
                              f"{record.state.value!r}; planned failover starts on a "
                              "replicating primary")
    async with site.primary(record) as primary:
        primary.capture.fenced_reason = f"VM {vm!r} is prepared for planned failover"
        await primary.replicate()
        position = await site.catalog.position(vm)
        if position is None:
            raise FailoverRefused(f"VM {vm!r} has not finished initial replication")
        digests = tuple(DiskDigest(name, sha256_of(image)) for name, image in zip(
            primary.capture.disk_names, primary.capture.images, strict=True)) if verify else ()
        prepared = FailoverPrepared(vm, record.epoch, position.cycle, position.cycle_hash,
                                    now_ms(), site.config.site, start_vm, digests)
        await primary.publisher.publish(primary.topic, vm.encode(), [encode(prepared)])
    await site.catalog.set_reverse_wanted(vm, reverse)
    await site.catalog.set_state(vm, ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
                                 f"final cycle {position.cycle} shipped; waiting for "
                                 f"{record.partner_site} to take over")
    return prepared


async def cancel_planned(site: Site, vm: str) -> None:
    """Cancel a planned failover on the primary, until the replica has taken over.

    Ships an empty cycle after the FailoverPrepared: a replica that has not yet acted on the
    prepare sees the primary carry on and stays a replica.
    """
    record = await site.catalog.vm(vm)
    found = await newest_epoch(site, vm, 0)
    if found is not None and found[1].epoch > record.epoch:
        raise FailoverRefused(f"too late: site {found[1].primary_site} took over VM {vm!r} in "
                              f"epoch {found[1].epoch}")
    async with site.primary(record) as primary:
        await primary.replicate()
    await site.catalog.set_reverse_wanted(vm, False)
    await site.catalog.set_state(vm, ReplicationState.REPLICATING, "planned failover cancelled")


async def follow_takeover(site: Site, vm: str) -> bool:
    """On a prepared old primary: once the new epoch is in the journal, become its replica
    (``--reverse``) or stand down as failed over. Returns whether the takeover happened."""
    found = await newest_epoch(site, vm, 0)
    record = await site.catalog.vm(vm)
    if found is None or found[1].epoch <= record.epoch:
        return False
    offset, start = found
    if await site.catalog.reverse_wanted(vm):
        await demote(site, vm, start, offset)
    else:
        await site.catalog.set_state(vm, ReplicationState.FAILED_OVER,
                                     f"site {start.primary_site} is primary since epoch "
                                     f"{start.epoch}; `vmreplica reverse {vm}` there makes "
                                     "this site its replica")
    return True


async def run_action(site: Site, vm: str, action: str, arguments: dict[str, Any]) -> str:
    """Carry out a CLI failover action (here, or in the agent); return what to print."""
    if action == "planned":
        await _hook(site.config.vm_stop_command, vm)
        prepared = await prepare_planned(site, vm, bool(arguments.get("reverse")),
                                         bool(arguments.get("start")),
                                         bool(arguments.get("verify")))
        return (f"VM {vm} prepared for planned failover at cycle {prepared.final_cycle}; "
                "its replica takes over once it applied that cycle")
    if action == "unplanned":
        start = await promote(site, vm, point=str(arguments.get("point", "latest")),
                              force=bool(arguments.get("force")))
        return (f"VM {vm} failed over at cycle {start.start_cycle - 1} (epoch {start.epoch}); "
                "`vmreplica failover complete` keeps it, `... cancel` goes back")
    if action == "complete":
        await complete(site, vm)
        return f"failover of VM {vm} completed; other recovery points deleted"
    if action == "cancel":
        record = await site.catalog.vm(vm)
        if record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER:
            await cancel_planned(site, vm)
            return f"planned failover of VM {vm} cancelled; it replicates as before"
        await cancel(site, vm)
        return f"failover of VM {vm} cancelled; replaying the journal"
    if action == "reverse":
        result = await reverse(site, vm)
        return (f"VM {vm} replicates to its old primary again: {result.diverged_bytes} bytes "
                f"diverged, {result.sent_bytes} bytes sent in cycle {result.cycle}"
                + (" (full copy: the old primary reported no diverged ranges)"
                   if result.full_copy else ""))
    raise ConfigurationError(f"unknown failover action {action!r}")


async def _hook(command: str | None, vm: str) -> None:
    """Run a hypervisor hook (``{vm}`` is replaced); a failing hook stops the failover."""
    if not command:
        return
    process = await asyncio.create_subprocess_shell(
        command.replace("{vm}", shlex.quote(vm)), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise FailoverRefused(f"hook {command!r} failed with exit {process.returncode}: "
                              f"{output.decode(errors='replace')[-500:]}")


async def promote(site: Site, vm: str, *, prepared: FailoverPrepared | None = None,
                  point: str = "latest", force: bool = False) -> EpochStart:
    """Make this replica site the VM's primary in a new epoch.

    Planned (``prepared`` given): the replica must stand exactly at the final cycle with the
    same hash. Unplanned: refused while the primary heartbeats (unless ``force``); the images
    are rolled back to ``point`` and the VM waits for :func:`complete` or :func:`cancel`.
    """
    record = await site.catalog.vm(vm)
    if record.role != "replica":
        raise FailoverRefused(f"VM {vm!r} is primary at this site; fail over on its replica")
    position = await site.catalog.position(vm)
    if position is None:
        raise FailoverRefused(f"VM {vm!r} has not finished initial replication here")
    points = await site.catalog.points(vm)
    if prepared is not None:
        if (position.cycle, position.cycle_hash) != (prepared.final_cycle, prepared.cycle_hash):
            raise FailoverRefused(
                f"VM {vm!r}: the replica is at cycle {position.cycle} but the primary prepared "
                f"cycle {prepared.final_cycle}; let it catch up and retry")
        for digest in prepared.disk_sha256:  # --verify: a full compare on top of the chain
            path = next(d.path for d in record.disks if d.name == digest.name)
            if sha256_of(path) != digest.sha256:
                raise FailoverRefused(
                    f"VM {vm!r}: disk {digest.name!r} differs from the primary's at cycle "
                    f"{prepared.final_cycle} although the hash chain matched. Operator action: "
                    f"cancel the failover on the primary and resynchronize")
        cycle, cycle_hash, reason = position.cycle, position.cycle_hash, "planned failover"
    else:
        seen = await site.catalog.primary_seen_ms(vm)
        if not force and seen is not None and now_ms() - seen < HEARTBEAT_GRACE_SECONDS * 1000:
            raise FailoverRefused(
                f"the primary of VM {vm!r} ({record.partner_site}) heartbeated "
                f"{(now_ms() - seen) / 1000:.0f} s ago; it is still running. Use a planned "
                "failover from the primary, or --force if it is really gone")
        chosen = choose_point(points, point)
        cycle, cycle_hash = chosen.cycle, chosen.cycle_hash
        reason = f"unplanned failover to cycle {cycle}"
    epoch = max([record.epoch, *await site.catalog.canceled_epochs(vm)]) + 1
    start = EpochStart(vm, epoch, record.epoch, site.config.site, cycle + 1, reason, now_ms(),
                       cycle_hash)
    offset = await _publish_epoch(site, record, start)  # the old primary is fenced from here
    undo = UndoLog(site.config.vm_folder(vm) / "undo")
    if cycle < position.cycle:
        _roll_back(record, undo, cycle, position.cycle)
        await site.catalog.drop_points_after(vm, cycle)
    if prepared is not None:  # a primary has no recovery points of its own
        await site.catalog.keep_points(vm, [])
    shutil.rmtree(site.config.vm_folder(vm) / "changelog", ignore_errors=True)
    state = (ReplicationState.REPLICATING if prepared is not None
             else ReplicationState.FAILED_OVER_WAITING_COMPLETION)
    moved = Position(epoch, cycle, cycle_hash, offset + 1, now_ms())
    await site.catalog.change_role(
        vm, "primary", record.partner_site, epoch, state, reason,
        position=moved if cycle >= position.cycle
        else Rewind(moved, f"{reason}, back from cycle {position.cycle}"),
        failover_point=None if prepared is not None else cycle)
    # Undo of cycles up to the point stays valid until the failed-over VM writes: it lets a
    # cancelled failover be retried at an older point.
    for later in undo.cycles():
        if prepared is not None or later > cycle:
            undo.discard(later)
    if prepared is not None and prepared.start_vm:
        await _hook(site.config.vm_start_command, vm)
    return start


def _roll_back(record: VmRecord, undo: UndoLog, point: int, head: int) -> None:
    """Images back to ``point``: head plus the undo of every later cycle (idempotent)."""
    overlay = undo.overlay_at(point, head)
    for disk in record.disks:
        with DiskImage.open(disk.path) as image:
            for offset, data in overlay.get(disk.name, ()):
                image.write(offset, data)
            image.fsync()


async def complete(site: Site, vm: str) -> None:
    """Keep the failed-over point for good: prune every other recovery point (no way back)."""
    record = await site.catalog.vm(vm)
    if record.state is not ReplicationState.FAILED_OVER_WAITING_COMPLETION:
        raise FailoverRefused(f"VM {vm!r} is {record.state.value!r}, not failed over waiting "
                              "completion")
    await site.catalog.keep_points(vm, [])
    UndoLog(site.config.vm_folder(vm) / "undo").discard_through(2**62)
    await site.catalog.set_state(vm, ReplicationState.FAILED_OVER,
                                 f"failed over at cycle {await site.catalog.failover_point(vm)}")


async def cancel(site: Site, vm: str) -> None:
    """Undo an unplanned failover not yet completed: be a replica again, replay the journal.

    Refused once the failed-over VM has written anything: cancelling would lose those writes.
    """
    record = await site.catalog.vm(vm)
    point = await site.catalog.failover_point(vm)
    if record.state is not ReplicationState.FAILED_OVER_WAITING_COMPLETION or point is None:
        raise FailoverRefused(f"VM {vm!r} is {record.state.value!r}; only a failover waiting "
                              "completion can be cancelled")
    changelog = site.config.vm_folder(vm) / "changelog"
    written = sum(len(read_segment(p, repair=True).records) for p in changelog.glob("*.hrl"))
    if written:
        raise FailoverRefused(
            f"VM {vm!r} has made {written} writes since the failover; cancelling would lose "
            "them. Complete the failover instead")
    stored = {p.cycle: p for p in await site.catalog.points(vm)}[point]
    await site.catalog.cancel_epoch(vm, record.epoch)
    shutil.rmtree(changelog, ignore_errors=True)
    await site.catalog.change_role(
        vm, "replica", record.partner_site, stored.epoch, ReplicationState.REPLICATING,
        f"failover cancelled; replaying the journal after cycle {point}",
        position=Rewind(Position(stored.epoch, point, stored.cycle_hash,
                                 stored.journal_offset + 1, now_ms()),
                        f"failover cancelled: back to cycle {point} of epoch {stored.epoch}"))


async def _journal_ranges(site: Site, vm: str, epoch: int, after_cycle: int,
                          ranges: dict[str, IntervalSet]) -> None:
    """Add the ranges written by ``epoch``'s cycles after ``after_cycle`` to ``ranges``."""
    async for _, event in journal_events(site, vm):
        if isinstance(event, WriteBatch) and event.epoch == epoch and event.cycle > after_cycle:
            for extent in event.extents:
                ranges.setdefault(extent.disk, IntervalSet()).add(
                    extent.offset, extent.offset + extent.length)


async def demote(site: Site, vm: str, start: EpochStart, start_offset: int) -> int:
    """The old primary of ``vm`` saw ``start`` (a newer epoch): become a replica of it.

    Publishes which ranges this site wrote after the new epoch's starting point (cycles that
    did ship, and what never left the change log) as ResyncRequests, then waits, as a replica,
    for the new primary's reverse. Returns the diverged bytes.
    """
    record = await site.catalog.vm(vm)
    position = await site.catalog.position(vm)
    shipped = position.cycle if position is not None else 0
    point = start.start_cycle - 1
    diverged: dict[str, IntervalSet] = {}
    if shipped > point:
        await _journal_ranges(site, vm, record.epoch, point, diverged)
    names = [d.name for d in record.disks]
    changelog = site.config.vm_folder(vm) / "changelog"
    try:
        if not changelog.is_dir():
            raise ChangeLogCorrupt(f"change log {changelog} is missing")
        _add_changelog_ranges(changelog, names, diverged)
        known = True
    except ChangeLogCorrupt:
        known = False  # the reverse falls back to comparing block digests
    total = sum(ranges.total() for ranges in diverged.values())
    in_sync = known and total == 0 and shipped == point
    if not in_sync:
        status = StatusPublisher(site.connection)
        await status.start()
        try:
            if known:
                for disk, ranges in sorted(diverged.items()) or [(names[0], IntervalSet())]:
                    event: ResyncRequest | DigestMap = ResyncRequest(
                        vm, start.epoch, site.config.site, f"diverged after cycle {point}",
                        disk, _byte_ranges(ranges), now_ms())
                    await status.publish(site.status_topic(vm), vm.encode(), encode(event))
            else:
                for image in record.disks:
                    block = digest_block_bytes(image.size_bytes)
                    event = DigestMap(vm, start.epoch, site.config.site, image.name, point,
                                      block, block_digests(image.path, block))
                    await status.publish(site.status_topic(vm), vm.encode(), encode(event))
        finally:
            await status.stop()
    shutil.rmtree(changelog, ignore_errors=True)
    moved = Position(start.epoch, point, start.last_cycle_hash, start_offset + 1, now_ms())
    await site.catalog.change_role(
        vm, "replica", start.primary_site, start.epoch,
        ReplicationState.REPLICATING if in_sync else ReplicationState.RESYNCHRONIZATION_REQUIRED,
        f"site {start.primary_site} is primary since epoch {start.epoch}"
        + ("" if in_sync else f"; {total} bytes diverged: run `vmreplica reverse {vm}` there"),
        position=moved if shipped <= point
        else Rewind(moved, f"cycles {point + 1}-{shipped} shipped here never reached "
                    f"{start.primary_site}, primary since epoch {start.epoch}"),
        failover_point=None if in_sync else point)
    return total


def _add_changelog_ranges(folder: Path, disks: list[str],
                          ranges: dict[str, IntervalSet]) -> None:
    """Add the ranges written in the unshipped change-log segments under ``folder``."""
    for path in sorted(folder.glob("*.hrl")):
        for entry in read_segment(path, repair=True).records:
            if entry.kind in (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM):
                ranges.setdefault(disks[entry.disk], IntervalSet()).add(
                    entry.offset, entry.offset + entry.length)


def digest_block_bytes(size: int) -> int:
    """The block size of a disk's DigestMap: 64 KiB, doubled until the map stays small."""
    block = 64 * 1024
    while size / block > DIGEST_BLOCKS_MAX:
        block *= 2
    return block


def block_digests(path: str | Path, block: int) -> bytes:
    """blake2b-128 of every block of the image, holes hashed as zeros without reading them."""
    zero_digest = hashlib.blake2b(bytes(block), digest_size=DIGEST_BYTES).digest()
    out = bytearray()
    with DiskImage.open(path, writable=False) as image:
        allocated = IntervalSet()
        for offset, length in image.allocated_extents():
            allocated.add(offset, offset + length)
        for start in range(0, image.size, block):
            end = min(start + block, image.size)
            if not allocated.covered(start, end):
                out += zero_digest if end - start == block else hashlib.blake2b(
                    bytes(end - start), digest_size=DIGEST_BYTES).digest()
            else:
                out += hashlib.blake2b(image.read(start, end - start),
                                       digest_size=DIGEST_BYTES).digest()
    return bytes(out)


def _byte_ranges(ranges: IntervalSet) -> tuple[ByteRange, ...]:
    pairs = list(zip(ranges.starts, ranges.ends, strict=True))
    while len(pairs) > MAX_RESYNC_RANGES:
        pairs = [(pairs[i][0], pairs[min(i + 1, len(pairs) - 1)][1])
                 for i in range(0, len(pairs), 2)]
    return tuple(ByteRange(start, end - start) for start, end in pairs)


async def _resync_requests(site: Site, record: VmRecord, replica_site: str,
                           ) -> dict[str, IntervalSet] | None:
    """Ranges the returning old primary reported for this epoch: as ResyncRequests, or else
    as DigestMaps compared block by block with this site's disks; None when it sent neither."""
    vm, epoch = record.name, record.epoch
    found: dict[str, IntervalSet] | None = None
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
            ours = block_digests(disk.path, theirs.block_size)
            ranges = found.setdefault(disk.name, IntervalSet())
            for index in range(len(ours) // DIGEST_BYTES):
                cut = slice(index * DIGEST_BYTES, (index + 1) * DIGEST_BYTES)
                if ours[cut] != theirs.digests[cut]:
                    start = index * theirs.block_size
                    ranges.add(start, min(start + theirs.block_size, disk.size_bytes))
    return found


async def reverse(site: Site, vm: str) -> ReverseResult:
    """On the new primary: make the old primary (the partner site) a replica again.

    Sends one cycle, in a new epoch naming the old primary in ``resync_sites``, holding the
    current content of every range that diverged: the old primary's unreplicated writes (from
    its ResyncRequests) and this site's writes since the failover. Without ResyncRequests the
    diverged set is unknown and every allocated range is sent.
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary" or record.state not in (
            ReplicationState.FAILED_OVER, ReplicationState.REPLICATING):
        raise FailoverRefused(f"VM {vm!r} is {record.role} in state {record.state.value!r}; "
                              "reverse runs on a failed-over primary (complete it first)")
    position = await site.catalog.position(vm)
    if position is None:
        raise JournalIntegrityError(f"VM {vm!r} has no position")
    old_primary = record.partner_site
    ranges = await _resync_requests(site, record, old_primary)
    full_copy = ranges is None
    ranges = ranges or {}
    ranges.pop("", None)
    point = await site.catalog.failover_point(vm)
    if point is not None:
        await _journal_ranges(site, vm, record.epoch, point, ranges)
    changelog = site.config.vm_folder(vm) / "changelog"
    _add_changelog_ranges(changelog, [d.name for d in record.disks], ranges)
    async with site.primary(record) as primary:
        capture = primary.capture
        if full_copy:
            for index, name in enumerate(capture.disk_names):
                for offset, length in capture.images[index].allocated_extents():
                    ranges.setdefault(name, IntervalSet()).add(offset, offset + length)
        diverged = sum(r.total() for r in ranges.values())
        epoch = record.epoch + 1
        start = EpochStart(vm, epoch, record.epoch, site.config.site, position.cycle + 1,
                           "reverse", now_ms(), position.cycle_hash, (old_primary,))
        await primary.publisher.publish(primary.topic, vm.encode(), [encode(start)])
        await site.catalog.set_epoch(vm, epoch)
        primary.shipper.builder.epoch = epoch
        for disk, disk_ranges in ranges.items():
            index = capture.disk(disk)
            for low, high in zip(disk_ranges.starts, disk_ranges.ends, strict=True):
                for chunk in range(low, high, 4 * 1024 * 1024):
                    data = capture.images[index].read(chunk, min(high, chunk + 4 * 1024 * 1024)
                                                      - chunk)
                    capture.log.write(index, chunk, data)
        capture.flush_sync()
        shipped = await primary.replicate()
    await site.catalog.change_role(vm, "primary", old_primary, epoch,
                                   ReplicationState.REPLICATING,
                                   f"replicating to {old_primary} again")
    sent = sum(cycle.wire_bytes for cycle in shipped)
    return ReverseResult(diverged, sent, shipped[-1].cycle if shipped else position.cycle,
                         full_copy)

