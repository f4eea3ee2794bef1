"""Reverse replication after a failover: the old primary becomes the new primary's replica.

- :func:`demote` (the old primary, on seeing a newer epoch): stop being primary, report what it
  wrote that never reached the new primary (:func:`~vmreplica.failover.divergence.
  report_divergence`), and wait, as a replica, to be resynchronised.
- :func:`reverse` (the new primary): send one cycle, in a new epoch naming the old primary in
  ``resync_sites``, holding the current content of every range that diverged on either side —
  not a full copy. It is the step a resynchronization ends with too
  (:meth:`~vmreplica.producers.primary.PrimaryVm.resend_in_new_epoch`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import Position, Rewind
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ChangeLogCorrupt, FailoverRefused, JournalIntegrityError
from vmreplica.failover.divergence import (
    Ranges,
    changelog_ranges,
    journal_ranges,
    report_divergence,
    reported_ranges,
)
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import EpochStart


@dataclass(frozen=True)
class ReverseResult:
    """What a reverse cost: the diverged bytes on both sides, and the bytes actually sent."""

    diverged_bytes: int
    sent_bytes: int
    cycle: int
    full_copy: bool


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
    diverged: Ranges = {}
    if shipped > point:
        await journal_ranges(site, vm, point, diverged, epoch=record.epoch)
    changelog = site.config.vm_folder(vm) / "changelog"
    try:
        if not changelog.is_dir():
            raise ChangeLogCorrupt(f"change log {changelog} is missing")
        changelog_ranges(changelog, [d.name for d in record.disks], diverged)
        known = True
    except ChangeLogCorrupt:
        known = False  # the reverse falls back to comparing block digests
    total = sum(ranges.total() for ranges in diverged.values())
    in_sync = known and total == 0 and shipped == point
    if not in_sync:
        await report_divergence(site, record, start, diverged if known else None)
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


async def reverse(site: Site, vm: str) -> ReverseResult:
    """On the new primary: make the old primary (the partner site) a replica again.

    Sends one cycle, in a new epoch naming the old primary in ``resync_sites``, holding the
    current content of every range that diverged: the old primary's unreplicated writes (from
    its ResyncRequests or DigestMaps) and this site's writes since the failover. Without either
    report the diverged set is unknown and every allocated range is sent.
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
    reported = await reported_ranges(site, record, old_primary)
    full_copy = reported is None
    ranges: Ranges = reported or {}
    point = await site.catalog.failover_point(vm)
    changelog = site.config.vm_folder(vm) / "changelog"
    changelog_ranges(changelog, [d.name for d in record.disks], ranges)
    async with site.primary(record) as primary:

        async def diverged_ranges() -> Ranges:
            """Asked once the cycles written since the failover have shipped."""
            if point is not None:
                await journal_ranges(site, vm, point, ranges, epoch=record.epoch)
            if full_copy:
                for name, allocated in primary.allocated_ranges().items():
                    target = ranges.setdefault(name, IntervalSet())
                    for low, high in zip(allocated.starts, allocated.ends, strict=True):
                        target.add(low, high)
            return ranges

        resent = await primary.resend_in_new_epoch((old_primary,), "reverse", diverged_ranges)
    await site.catalog.change_role(vm, "primary", old_primary, resent.start.epoch,
                                   ReplicationState.REPLICATING,
                                   f"replicating to {old_primary} again")
    diverged = sum(r.total() for r in ranges.values())
    sent = sum(cycle.wire_bytes for cycle in resent.shipped)
    return ReverseResult(diverged, sent, resent.shipped[-1].cycle if resent.shipped
                         else position.cycle, full_copy)
