"""Unplanned failover, on the replica: take over at a recovery point, then complete or cancel.

:func:`promote` is also where a planned failover ends: the replica's takeover is one step for
both, a new epoch whose EpochStart (published with the VM's shared ``transactional_id``) fences
the old primary's producer at the broker. Unplanned, it is refused while the primary still
heartbeats (unless forced) and rolls the images back to the chosen point from the undo logs;
:func:`complete` then keeps that point for good, :func:`cancel` goes back to being a replica and
replays the journal forward.

The new primary captures the disks the way the old one did: its record holds the VM's settings
as the old primary published them (VmConfig), ``capture`` among them, so the agent serves the
same NBD export names, or scans — from block digests taken at the takeover point
(:func:`record_scan_baseline`), so its first scan sends only what the VM wrote since.

No broker is needed: the takeover is recorded here first and published second, so a site
whose Kafka went down with the primary's site can still fail over. Steps:

0. roll back a cycle the replica's agent left half applied (stopped between two fetches of a
   big cycle): the images then hold the catalog's applied cycle (idempotent);
1. roll the images back to the point (idempotent: head plus the undo of every later cycle);
2. switch role in one catalog transaction, the new EpochStart kept in it as *pending*
   (:meth:`~vmreplica.storage.catalog.Catalog.change_role`) — from here this site is primary;
3. discard the undo logs this failover no longer needs;
4. publish the EpochStart (:func:`~vmreplica.failover.journal.publish_pending`): the old
   primary's producer is fenced at the broker from then on. With no broker answering it stays
   pending, and the agent publishes it as soon as one does (the new primary captures and serves
   the VM meanwhile, shipping nothing until the epoch is out).

A crash before 2 leaves a replica (run the failover again); after 2, a primary whose agent
publishes the pending epoch — or finds it already in the journal (a crash between 4 and its
record) and only records its offset.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from vmreplica.consumers.points import choose_point
from vmreplica.consumers.undo import UndoLog
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Position, Rewind, VmRecord
from vmreplica.domain.states import ReplicationState, primary_live
from vmreplica.errors import BrokerUnreachable, FailoverRefused
from vmreplica.failover.fanout import regroup
from vmreplica.failover.journal import publish_pending
from vmreplica.failover.planned import check_takeover, start_vm
from vmreplica.producers.changelog import read_segment
from vmreplica.producers.scan import SCAN_BLOCK_BYTES, hashes_path, save_hashes
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import EpochStart, FailoverPrepared
from vmreplica.storage.digests import image_digests
from vmreplica.storage.image import DiskImage

log = logging.getLogger(__name__)


async def promote(
    site: Site,
    vm: str,
    *,
    prepared: FailoverPrepared | None = None,
    point: str = "latest",
    force: bool = False,
) -> EpochStart:
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
        check_takeover(record, position, prepared, site.config.site)
        cycle, cycle_hash, reason = position.cycle, position.cycle_hash, "planned failover"
    else:
        seen = await site.catalog.primary_seen_ms(vm)
        if (
            not force
            and seen is not None
            and primary_live(seen, now_ms(), site.config.heartbeat_seconds)
        ):
            raise FailoverRefused(
                f"the primary of VM {vm!r} ({record.partner_site}) heartbeated "
                f"{(now_ms() - seen) / 1000:.0f} s ago; it is still running. Use a planned "
                "failover from the primary, or --force if it is really gone"
            )
        chosen = choose_point(points, point)
        cycle, cycle_hash = chosen.cycle, chosen.cycle_hash
        reason = f"unplanned failover to cycle {cycle}"
    epoch = max([record.epoch, *await site.catalog.canceled_epochs(vm)]) + 1
    start = EpochStart(
        vm, epoch, record.epoch, site.config.site, cycle + 1, reason, now_ms(), cycle_hash
    )
    undo = UndoLog(site.config.vm_folder(vm) / "undo")
    _roll_back_interrupted(record, undo, position.cycle)  # step 0
    if cycle < position.cycle:
        _roll_back(record, undo, cycle, position.cycle)  # step 1
        await site.catalog.drop_points_after(vm, cycle)
    if prepared is not None:  # a primary has no recovery points of its own
        await site.catalog.keep_points(vm, [])
    shutil.rmtree(site.config.vm_folder(vm) / "changelog", ignore_errors=True)
    partner, settings = regroup(record, site.config.site, site.config.site)
    if settings.capture == "scan":
        await asyncio.to_thread(record_scan_baseline, site.config.vm_folder(vm), record)
    state = (
        ReplicationState.REPLICATING
        if prepared is not None
        else ReplicationState.FAILED_OVER_WAITING_COMPLETION
    )
    # Until the EpochStart is published, the journal is known up to where this replica read.
    moved = Position(epoch, cycle, cycle_hash, position.next_offset, now_ms())
    await site.catalog.change_role(  # step 2
        vm,
        "primary",
        partner,
        epoch,
        state,
        reason,
        position=moved
        if cycle >= position.cycle
        else Rewind(moved, f"{reason}, back from cycle {position.cycle}"),
        failover_point=None if prepared is not None else cycle,
        settings=settings,
        pending_epoch=encode(start),
    )
    # Undo of cycles up to the point stays valid until the failed-over VM writes: it lets a
    # cancelled failover be retried at an older point.
    for later in undo.cycles():  # step 3
        if prepared is not None or later > cycle:
            undo.discard(later)
    try:
        await publish_pending(site, vm)  # step 4: the old primary is fenced from here
    except BrokerUnreachable as error:
        log.warning(
            "VM %s: primary here in epoch %d, not yet published (%s); the agent publishes it "
            "as soon as a broker answers",
            vm,
            epoch,
            error,
        )
    if prepared is not None and prepared.start_vm:
        await start_vm(site, record)
    return start


def record_scan_baseline(folder: Path, record: VmRecord) -> None:
    """A ``--capture scan`` VM taken over here: save its images' block digests as the state
    last shipped, so the first scan sends only what the VM writes from now on (without them it
    would resend every block). The images hold exactly the takeover point at this moment."""
    scan = folder / "scan"
    for disk in record.disks:
        digests = image_digests(disk.path, SCAN_BLOCK_BYTES)
        save_hashes(hashes_path(scan, disk.name), disk.size_bytes, digests)


def _roll_back_interrupted(record: VmRecord, undo: UndoLog, applied: int) -> None:
    """Images back to the applied cycle if the replica's agent stopped in the middle of the
    next one (killed half-way through a big cycle); idempotent."""
    images = {disk.name: DiskImage.open(disk.path) for disk in record.disks}
    try:
        undo.roll_back_interrupted(images, applied)
    finally:
        for image in images.values():
            image.close()


def _roll_back(record: VmRecord, undo: UndoLog, point: int, head: int) -> None:
    """Images back to ``point``: head plus the undo of every later cycle (idempotent)."""
    with undo.overlay_at(point, head) as overlay:
        for disk in record.disks:
            with DiskImage.open(disk.path) as image:
                for offset, data in overlay.ranges(disk.name):
                    image.write(offset, data)
                image.fsync()


async def complete(site: Site, vm: str) -> None:
    """Keep the failed-over point for good: prune every other recovery point (no way back)."""
    record = await site.catalog.vm(vm)
    if record.state is not ReplicationState.FAILED_OVER_WAITING_COMPLETION:
        raise FailoverRefused(
            f"VM {vm!r} is {record.state.value!r}, not failed over waiting completion"
        )
    await site.catalog.keep_points(vm, [])
    UndoLog(site.config.vm_folder(vm) / "undo").discard_through(2**62)
    await site.catalog.set_state(
        vm,
        ReplicationState.FAILED_OVER,
        f"failed over at cycle {await site.catalog.failover_point(vm)}",
    )


async def cancel(site: Site, vm: str) -> None:
    """Undo an unplanned failover not yet completed: be a replica again, replay the journal.

    Refused once the failed-over VM has written anything: cancelling would lose those writes.
    """
    record = await site.catalog.vm(vm)
    point = await site.catalog.failover_point(vm)
    if record.state is not ReplicationState.FAILED_OVER_WAITING_COMPLETION or point is None:
        raise FailoverRefused(
            f"VM {vm!r} is {record.state.value!r}; only a failover waiting "
            "completion can be cancelled"
        )
    changelog = site.config.vm_folder(vm) / "changelog"
    written = sum(len(read_segment(p, repair=True).records) for p in changelog.glob("*.hrl"))
    if written:
        raise FailoverRefused(
            f"VM {vm!r} has made {written} writes since the failover; cancelling would lose "
            "them. Complete the failover instead"
        )
    stored = {p.cycle: p for p in await site.catalog.points(vm)}[point]
    await site.catalog.cancel_epoch(vm, record.epoch)
    shutil.rmtree(changelog, ignore_errors=True)
    await site.catalog.change_role(
        vm,
        "replica",
        record.partner_site,
        stored.epoch,
        ReplicationState.REPLICATING,
        f"failover cancelled; replaying the journal after cycle {point}",
        position=Rewind(
            Position(stored.epoch, point, stored.cycle_hash, stored.journal_offset + 1, now_ms()),
            f"failover cancelled: back to cycle {point} of epoch {stored.epoch}",
        ),
    )
