"""Reverse replication after a failover: the old primary becomes the new primary's replica.

- :func:`demote` (the old primary, on seeing a newer epoch): stop being primary, report what it
  wrote that never reached the new primary (:func:`~vmreplica.failover.divergence.
  report_divergence`), and wait, as a replica, to be resynchronised.
- :func:`reverse` (the new primary): wait for that report, then send one cycle, in a new epoch
  naming the old primary in ``resync_sites``, holding the current content of every range that
  diverged on either side — not a full copy (unless asked for one). It is the step a
  resynchronization ends with too
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
    REPORT_WAIT_SECONDS,
    Ranges,
    changelog_ranges,
    journal_ranges,
    report_divergence,
    reported_ranges,
)
from vmreplica.failover.fanout import regroup
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
    did ship, and what never left the change log or its dirty-block map) as ResyncRequests —
    always, an empty one per disk when nothing diverged, so that the new primary's ``reverse``
    knows the report is complete — then waits, as a replica, for the new primary's reverse
    (or, in sync, applies its journal at once). Returns the diverged bytes.
    """
    record = await site.catalog.vm(vm)
    position = await site.catalog.position(vm)
    shipped = position.cycle if position is not None else 0
    point = start.start_cycle - 1
    diverged: Ranges = {}
    committed: set[int] = set()
    if shipped > point:
        await journal_ranges(site, vm, point, diverged, epoch=record.epoch, committed=committed)
    changelog = site.config.vm_folder(vm) / "changelog"
    try:
        if not changelog.is_dir():
            raise ChangeLogCorrupt(f"change log {changelog} is missing")
        changelog_ranges(changelog, record.disks, diverged)
        known = True
    except ChangeLogCorrupt:
        known = False  # the reverse falls back to comparing block digests
    if not committed >= set(range(point + 1, shipped + 1)):
        # Cycles this site shipped are not in this journal (it is another cluster's, the
        # lost one had them): what they wrote is not known here, so digests decide.
        known = False
    total = sum(ranges.total() for ranges in diverged.values())
    in_sync = known and total == 0 and shipped == point
    await report_divergence(site, record, start, diverged if known else None)
    shutil.rmtree(changelog, ignore_errors=True)
    # A reverse that did not wait for this report (``--full-copy``) already started its
    # epoch, naming this site: read from that epoch's start, so the resync applies.
    resync_now = site.config.site in start.resync_sites
    moved = Position(
        start.epoch,
        point,
        start.last_cycle_hash,
        start_offset if resync_now else start_offset + 1,
        now_ms(),
    )
    partner, settings = regroup(record, site.config.site, start.primary_site)
    await site.catalog.change_role(
        vm,
        "replica",
        partner,
        start.epoch,
        ReplicationState.REPLICATING if in_sync else ReplicationState.RESYNCHRONIZATION_REQUIRED,
        f"site {start.primary_site} is primary since epoch {start.epoch}"
        + ("" if in_sync else f"; {total} bytes diverged: run `vmreplica reverse {vm}` there"),
        position=moved
        if shipped <= point
        else Rewind(
            moved,
            f"cycles {point + 1}-{shipped} shipped here never reached "
            f"{start.primary_site}, primary since epoch {start.epoch}",
        ),
        failover_point=None if in_sync else point,
        settings=settings,
    )
    return total


async def reverse(
    site: Site, vm: str, *, full_copy: bool = False, wait_seconds: float = REPORT_WAIT_SECONDS
) -> ReverseResult:
    """On the new primary: make the old primary (the partner site) a replica again.

    Sends one cycle, in a new epoch naming the old primary in ``resync_sites``, holding the
    current content of every range that diverged: the old primary's unreplicated writes (from
    its ResyncRequests or DigestMaps) and this site's writes since the failover. The old
    primary reports as soon as its agent runs and sees the new epoch; this waits up to
    ``wait_seconds`` for that report. ``full_copy`` sends every disk whole instead (holes as
    zero extents), without waiting: for an old primary that cannot report.

    :raises FailoverRefused: not a failed-over primary here, or no report arrived in time.
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary" or record.state not in (
        ReplicationState.FAILED_OVER,
        ReplicationState.REPLICATING,
    ):
        raise FailoverRefused(
            f"VM {vm!r} is {record.role} in state {record.state.value!r}; "
            "reverse runs on a failed-over primary (complete it first)"
        )
    position = await site.catalog.position(vm)
    if position is None:
        raise JournalIntegrityError(f"VM {vm!r} has no position")
    old_primary = record.partner_site
    ranges: Ranges = {}
    if not full_copy:
        reported = await reported_ranges(site, record, old_primary, wait_seconds)
        if reported is None:
            raise FailoverRefused(
                f"site {old_primary} has not reported which ranges of VM {vm!r} it wrote "
                f"that never reached this site (waited {wait_seconds:.0f} s). Its agent "
                f"reports them as soon as it runs and sees epoch {record.epoch}. Operator "
                f"action: start the agent at {old_primary} and run reverse again, or "
                "`vmreplica reverse --full-copy` to send every disk whole"
            )
        ranges = reported
    point = await site.catalog.failover_point(vm)
    changelog = site.config.vm_folder(vm) / "changelog"
    changelog_ranges(changelog, record.disks, ranges)
    async with site.primary(record) as primary:

        async def diverged_ranges() -> Ranges:
            """Asked once the cycles written since the failover have shipped."""
            if point is not None:
                await journal_ranges(site, vm, point, ranges, epoch=record.epoch)
            if full_copy:  # every disk whole: data as data, holes as zero extents
                for disk in record.disks:
                    ranges.setdefault(disk.name, IntervalSet()).add(0, disk.size_bytes)
            return ranges

        resent = await primary.resend_in_new_epoch((old_primary,), "reverse", diverged_ranges)
    await site.catalog.change_role(
        vm,
        "primary",
        old_primary,
        resent.start.epoch,
        ReplicationState.REPLICATING,
        f"replicating to {old_primary} again",
    )
    diverged = sum(r.total() for r in ranges.values())
    sent = sum(cycle.wire_bytes for cycle in resent.shipped)
    return ReverseResult(
        diverged, sent, resent.shipped[-1].cycle if resent.shipped else position.cycle, full_copy
    )
