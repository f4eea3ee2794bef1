"""Resynchronization: make a replica equal to its primary again, sending only what differs.

``vmreplica resync VM`` on the primary (Hyper-V's ``Resume-VMReplication -Resynchronize``) for
a replica that diverged: its image was changed behind the agent's back, or a journal violation
left it in "resynchronization required". The VM keeps running throughout; what it writes
meanwhile ships in the ordinary cycles, and the replica ends at a cycle boundary, equal to the
primary, replicating as before. The steps, each durable before the next starts:

1. **Accept** (:func:`accept_resync`): the job is written to ``<vm folder>/resync.json``
   with the status topic's end offset; the primary's state is "resynchronizing".
2. **Ask**: a DigestRequest naming the replica site is published to the journal.
3. **Digests**: the replica, reading the request at a cycle boundary (or frozen at its last
   good cycle after a violation), publishes its position and a DigestMap of every disk on the
   status topic (``consumers/replica.py``); the primary takes the newest complete set published
   after the offset of step 1, checks that each fits its disk (block size, digest count), and
   records it in the job.
4. **Compare**: the primary hashes its own disks block by block (holes cost nothing) and
   records the blocks that differ in the job.
5. **Send** (:meth:`~vmreplica.producers.primary.PrimaryVm.resend_in_new_epoch`, shared with
   reverse replication): with no cycle cut meanwhile, the cycles already sealed ship; the
   current content of the differing blocks, and of every range written by a cycle after the
   replica's digests, is appended to the open cycle; an EpochStart naming the replica in
   ``resync_sites`` is published; that cycle is cut and shipped. The replica applies it like
   any cycle (undo log, all-or-nothing): if it was still applying, the epoch simply continues
   its chain; if a violation froze it, it skips the journal until that epoch and adopts it.
   Either way the images equal the primary's at that cycle, recovery points from before it are
   deleted (they hold the diverged blocks), and the replica is replicating again.

Resending every range written after the digests is what makes the result exact whatever the
replica did meanwhile: blocks outside those ranges have not changed on the primary since the
replica's digests were taken, so where the digests matched, the replica holds them already.

A kill of the primary's agent resumes the job from the file: before step 2 completes the request
is published again; while waiting, the digests already on the status topic are found again;
during the compare it starts over (the digests stay); during step 5 the journal says whether
the epoch was published and its first cycle shipped (the content is in the change log from
step 5's append on, so whichever cycle ships first carries it). A kill of the replica's agent
before it published its digests makes it read the request again; after, changes nothing.

About 500 lines: the five steps and how each resumes after a kill read as one protocol; the job
file and its lock are :mod:`vmreplica.failover.resync_job`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, DecodeError, ResyncRefused
from vmreplica.failover.divergence import (
    Ranges,
    check_digest_map,
    differing_ranges,
    journal_ranges,
)
from vmreplica.failover.journal import journal_events
from vmreplica.failover.resync_job import (
    Phase,
    ResyncJob,
    load_job,
    running,
    save_job,
)
from vmreplica.journal.kafka import JournalReader, read_to_end
from vmreplica.producers.primary import PrimaryVm
from vmreplica.producers.shipper import ShippedCycle
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import DigestMap, DigestRequest, EpochStart, ReplicaPosition

log = logging.getLogger(__name__)

DIGESTS_POLL_SECONDS: Final = 0.5
"""How often the status topic is read for the replica's digests."""
REASK_SECONDS: Final = 120.0
"""The DigestRequest is published again when no digests came for this long (a replica that
could not publish them, a request lost with a broker)."""
PROGRESS_SAVE_SECONDS: Final = 1.0
"""How often the compare writes its progress to the job file, for `vmreplica status`."""

STARTING_STATES: Final = frozenset(
    {
        ReplicationState.REPLICATING,
        ReplicationState.RESYNCHRONIZATION_REQUIRED,
        ReplicationState.RESYNCHRONIZING,
    }
)
"""Primary states a resync may start from: replicating, told by a replica that it needs one,
or resynchronizing with no job left (its file removed by hand)."""


class DigestsNotYet(ResyncRefused):
    """The replica sent no digests in time (its agent is not running?): the job stays pending
    and continues when the agent runs, or with `vmreplica resync` again."""


def _ranges(differing: Mapping[str, Sequence[tuple[int, int]]]) -> Ranges:
    ranges: Ranges = {}
    for disk, pairs in differing.items():
        target = ranges.setdefault(disk, IntervalSet())
        for low, high in pairs:
            target.add(low, high)
    return ranges


async def status_end(site: Site, vm: str) -> int:
    """The status topic's end offset: where records published from now on start."""
    async with JournalReader(site.connection, site.status_topic(vm)) as reader:
        return await reader.end_offset()


async def accept_resync(
    site: Site,
    vm: str,
    target: str = "",
    reason: str = "",
    *,
    status_from: int | None = None,
    not_before_ms: int = 0,
    automatic: bool = False,
) -> ResyncJob:
    """Step 1: check the request and record the job; the VM's primary worker runs it.

    ``target`` defaults to the VM's replica site; ``status_from`` to the status topic's end
    (digests published before the request are not trusted: the image may have changed since).

    :raises ConfigurationError: an unknown VM, a replica site here, a site that is not one of
        the VM's replicas (a mistake: exit 2).
    :raises ResyncRefused: the VM is not replicating, or a resync of it is running (exit 1).
    """
    record = await site.catalog.vm(vm)
    if record.role != "primary":
        raise ConfigurationError(
            f"VM {vm!r} is a replica at site {site.config.site}; a resync starts on its "
            f"primary: run `vmreplica resync {vm}` at {record.partner_site}"
        )
    replicas = (record.partner_site, *record.settings.also_replicate_to)
    target = target or record.partner_site
    if target not in replicas:
        raise ConfigurationError(
            f"site {target!r} keeps no replica of VM {vm!r}; its replica "
            f"sites are {', '.join(replicas)}"
        )
    folder = site.config.vm_folder(vm)
    current = load_job(folder)
    if current is not None and current.active:
        raise ResyncRefused(
            f"a resync of VM {vm!r} to {current.target} is already running "
            f"({current.phase}); one at a time. `vmreplica status {vm}` shows "
            "its progress"
        )
    if record.state not in STARTING_STATES:
        raise ResyncRefused(
            f"VM {vm!r} is {record.state.value!r} here; a resync starts on a replicating VM "
            "(let its initial replication finish, or complete its failover and reverse it)"
        )
    needed = automatic or record.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
    job = ResyncJob(
        vm,
        target,
        reason or "requested by the operator",
        now_ms(),
        record.epoch,
        status_from if status_from is not None else await status_end(site, vm),
        "scheduled" if not_before_ms > now_ms() else "requested",
        automatic=automatic,
        resume_state=(
            ReplicationState.RESYNCHRONIZATION_REQUIRED if needed else ReplicationState.REPLICATING
        ).value,
        not_before_ms=not_before_ms,
        total_bytes=sum(d.size_bytes for d in record.disks),
    )
    save_job(folder, job)
    await site.catalog.set_state(vm, ReplicationState.RESYNCHRONIZING, job.summary())
    return job


class ResyncRun:
    """Steps 2-5 of one job, with the VM's open :class:`PrimaryVm`; resumes where the job
    file says. ``await ResyncRun(site, primary).run()``."""

    def __init__(
        self, site: Site, primary: PrimaryVm, digests_timeout_seconds: float | None = None
    ) -> None:
        self.site = site
        self.primary = primary
        self.vm = primary.name
        self.folder = site.config.vm_folder(self.vm)
        self.digests_timeout_seconds = digests_timeout_seconds
        found = load_job(self.folder)
        if found is None or not found.active:
            raise ConfigurationError(f"VM {self.vm!r} has no resync to run")
        self.job = found

    def _save(self, **changes: Any) -> ResyncJob:
        self.job = replace(self.job, **changes)
        save_job(self.folder, self.job)
        return self.job

    async def run(self) -> ResyncJob:
        """Carry the job to its end; return it done.

        :raises ResyncRefused: the digests do not fit the disks, or did not come in time
            (the job stays pending then); nothing was sent.
        :raises BrokerError: Kafka failed; the job stays pending and resumes.
        """
        record = await self.site.catalog.vm(self.vm)
        try:
            if self.job.phase == "scheduled":
                await self._when_due()
            if self.job.phase == "requested":
                await self._ask()
            if self.job.phase == "awaiting digests":
                maps = await self._digests(record)
                await self._compare(record, maps)
            elif self.job.phase == "comparing":
                await self._compare(record, await self._digests(record))
            if self.job.phase == "sending":
                await self._send()
        except DigestsNotYet:
            raise
        except ResyncRefused as refusal:
            await self._finish("refused", str(refusal))
            raise
        return self.job

    async def _when_due(self) -> None:
        await asyncio.sleep(max(0.0, (self.job.not_before_ms - now_ms()) / 1000))
        self._save(phase="requested")

    async def _ask(self) -> None:
        """Step 2: the DigestRequest (again, after a kill that may have lost it)."""
        await self.primary.publish(
            DigestRequest(
                self.vm,
                self.primary.record.epoch,
                self.site.config.site,
                (self.job.target,),
                self.job.reason,
                now_ms(),
            )
        )
        self._save(
            phase="awaiting digests",
            asked_ms=now_ms(),
            message=f"waiting for the block digests of {self.job.target}",
        )
        log.info("VM %s: asked %s for block digests", self.vm, self.job.target)

    async def _digests(self, record: VmRecord) -> dict[str, DigestMap]:
        """Step 3: the newest complete set of the target's DigestMaps since ``status_from``."""
        started = time.monotonic()
        offset = self.job.status_from
        sets: dict[tuple[int, int], dict[str, DigestMap]] = {}
        newest: dict[tuple[int, int], int] = {}
        """Where each set's last map stands on the topic."""
        positions: dict[tuple[int, int], ReplicaPosition] = {}
        disks = {d.name: d for d in record.disks}
        while True:
            async for message in read_to_end(
                self.site.connection, self.site.status_topic(self.vm), offset
            ):
                offset = message.offset + 1
                try:
                    event = await self.site.trusted_status(self.vm, message.offset, message.value)
                except DecodeError:
                    continue  # not a record of ours: it can prove nothing about the replica
                if event is None or event.site != self.job.target:
                    continue
                if isinstance(event, ReplicaPosition):
                    positions[(event.epoch, event.cycle)] = event
                elif isinstance(event, DigestMap):
                    if event.disk not in disks:
                        raise ResyncRefused(
                            f"VM {self.vm!r}: site {event.site} sent block digests of a disk "
                            f"{event.disk!r} that this VM does not have (its disks are "
                            f"{', '.join(disks)}); nothing was sent. Operator action: check "
                            "that both sites replicate the same VM, then resync again"
                        )
                    sets.setdefault((event.epoch, event.cycle), {})[event.disk] = event
                    newest[(event.epoch, event.cycle)] = message.offset
            complete = [key for key, maps in sets.items() if len(maps) == len(disks)]
            if complete:
                key = max(complete, key=newest.__getitem__)
                return await self._take(record, sets[key], positions.get(key))
            waited = time.monotonic() - started
            if self.digests_timeout_seconds is not None and waited > self.digests_timeout_seconds:
                raise DigestsNotYet(
                    f"VM {self.vm!r}: site {self.job.target} sent no block digests within "
                    f"{self.digests_timeout_seconds:.0f} s (is its agent running?). The resync "
                    "stays pending: it continues when `vmreplica agent` runs here, or with "
                    f"`vmreplica resync {self.vm}` again"
                )
            if now_ms() - self.job.asked_ms > REASK_SECONDS * 1000:
                await self._ask()
            await asyncio.sleep(DIGESTS_POLL_SECONDS)

    async def _take(
        self, record: VmRecord, maps: dict[str, DigestMap], position: ReplicaPosition | None
    ) -> dict[str, DigestMap]:
        """Check the set fits this VM before anything is compared or sent."""
        shipped = await self.site.catalog.position(self.vm)
        for disk in record.disks:
            check_digest_map(self.vm, disk, maps[disk.name])
        some = next(iter(maps.values()))
        if some.epoch > record.epoch or shipped is None or some.cycle > shipped.cycle:
            raise ResyncRefused(
                f"VM {self.vm!r}: site {some.site} sent block digests as of cycle {some.cycle} "
                f"of epoch {some.epoch}, ahead of what this primary shipped (cycle "
                f"{shipped.cycle if shipped else None} of epoch {record.epoch}); nothing was "
                "sent. Operator action: check that no other primary writes this VM's journal"
            )
        journal_from = position.offset + 1 if position is not None and position.offset >= 0 else 0
        self._save(
            phase="comparing",
            digest_epoch=some.epoch,
            digest_cycle=some.cycle,
            journal_from=journal_from,
            examined_bytes=0,
            differing_bytes=0,
            message=f"comparing with the digests of cycle {some.cycle}",
        )
        return maps

    async def _compare(self, record: VmRecord, maps: Mapping[str, DigestMap]) -> None:
        """Step 4: this site's digests against the replica's, block by block."""
        differing: dict[str, list[tuple[int, int]]] = {}
        done_before = 0
        examined = [0]
        saver = asyncio.create_task(self._save_progress(examined))
        try:
            for disk in record.disks:
                base = done_before

                def progress(offset: int, base: int = base) -> None:
                    examined[0] = base + offset

                ranges = await asyncio.to_thread(
                    differing_ranges, self.vm, disk, maps[disk.name], progress
                )
                differing[disk.name] = list(zip(ranges.starts, ranges.ends, strict=True))
                done_before += disk.size_bytes
                self.job = replace(
                    self.job, differing_bytes=self.job.differing_bytes + ranges.total()
                )
        finally:
            saver.cancel()
            await asyncio.gather(saver, return_exceptions=True)
        total = sum(high - low for pairs in differing.values() for low, high in pairs)
        self._save(
            phase="sending",
            examined_bytes=done_before,
            differing_bytes=total,
            differing=differing,
            message=f"sending the {total} bytes that differ",
        )
        log.info(
            "VM %s: %d of %d bytes differ from %s", self.vm, total, done_before, self.job.target
        )

    async def _save_progress(self, examined: list[int]) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SAVE_SECONDS)
            self._save(examined_bytes=examined[0])

    async def _send(self) -> None:
        """Step 5, or what is left of it after a kill."""
        published = await self._resync_epoch()
        position = await self.site.catalog.position(self.vm)
        if published is not None:
            if (
                position is None
                or position.epoch < published.epoch
                or (position.cycle < published.start_cycle)
            ):
                await self.primary.replicate(force=True)  # the content waits in the open cycle
            await self._done(published, 0, [])
            return
        job = self.job
        ranges = _ranges(job.differing)
        # Most of the journal after the digests is read before the cycle lock is taken; only
        # what ships meanwhile is read under it.
        read_from = await journal_ranges(
            self.site,
            self.vm,
            job.digest_cycle,
            ranges,
            min_epoch=job.digest_epoch,
            start=job.journal_from,
        )

        async def to_resend() -> Ranges:
            await journal_ranges(
                self.site,
                self.vm,
                job.digest_cycle,
                ranges,
                min_epoch=job.digest_epoch,
                start=read_from,
            )
            return ranges

        resent = await self.primary.resend_in_new_epoch(
            (job.target,), f"resync of {job.target}", to_resend
        )
        await self._done(resent.start, resent.resent_bytes, resent.shipped)

    async def _resync_epoch(self) -> EpochStart | None:
        """This job's EpochStart, if a kill came after it was published."""
        found = None
        async for _, event in journal_events(self.site, self.vm, self.job.journal_from):
            if (
                isinstance(event, EpochStart)
                and event.epoch > self.job.base_epoch
                and event.primary_site == self.site.config.site
                and self.job.target in event.resync_sites
            ):
                found = event
        return found

    async def _done(self, start: EpochStart, resent: int, shipped: Sequence[ShippedCycle]) -> None:
        last = shipped[-1] if shipped else None
        self.job = replace(
            self.job,
            epoch=start.epoch,
            cycle=start.start_cycle,
            resent_bytes=resent or self.job.resent_bytes,
            sent_bytes=last.wire_bytes if last is not None else 0,
        )
        await self._finish("done", "")

    async def _finish(self, phase: Phase, message: str) -> None:
        """The state first, then the job: a kill between leaves an active job, which resumes
        and finishes again, instead of a finished job under a state that never ends."""
        job = replace(self.job, phase=phase, message=message, finished_ms=now_ms())
        if phase == "done":
            await self.site.catalog.set_state(self.vm, ReplicationState.REPLICATING, job.summary())
        else:
            await self.site.catalog.set_state(
                self.vm, ReplicationState(job.resume_state), after_refusal(job)
            )
        self.job = job
        save_job(self.folder, job)
        log.info("VM %s: %s", self.vm, job.summary())


async def cancel_resync(site: Site, vm: str) -> ResyncJob:
    """Stop a resync that has not started sending (Hyper-V's Stop-VMReplication).

    :raises ResyncRefused: none runs, or it is sending its last cycle already.
    """
    folder = site.config.vm_folder(vm)
    job = load_job(folder)
    if job is None or not job.active:
        raise ResyncRefused(f"no resync of VM {vm!r} is running")
    if job.phase == "sending":
        raise ResyncRefused(
            f"the resync of VM {vm!r} is sending the blocks that differ; it "
            "cannot be cancelled now, and ends in a moment"
        )
    cancelled = replace(
        job, phase="cancelled", message="cancelled by the operator", finished_ms=now_ms()
    )
    await site.catalog.set_state(vm, ReplicationState(job.resume_state), after_refusal(cancelled))
    save_job(folder, cancelled)
    return cancelled


def after_refusal(job: ResyncJob) -> str:
    """The primary's state message once ``job`` was refused or cancelled."""
    if job.resume_state == ReplicationState.REPLICATING.value:
        return f"{job.summary()}; replicating as before"
    return (
        f"{job.summary()}; {job.target} still needs a resynchronization: run "
        f"`vmreplica resync {job.vm}` once the cause is fixed"
    )


async def resync_here(
    site: Site,
    vm: str,
    target: str = "",
    *,
    digests_timeout_seconds: float | None = None,
    not_before_ms: int = 0,
) -> ResyncJob:
    """A whole resync in this process (no agent runs): accept it, or continue the one pending,
    and run it to its end with the VM's primary opened here."""
    folder = site.config.vm_folder(vm)
    with running(folder):
        current = load_job(folder)
        if current is None or not current.active:
            await accept_resync(site, vm, target, not_before_ms=not_before_ms)
        elif target and target != current.target:
            raise ResyncRefused(
                f"a resync of VM {vm!r} to {current.target} is pending; it "
                "must end before another starts"
            )
        record = await site.catalog.vm(vm)
        async with site.primary(record) as primary:
            return await ResyncRun(site, primary, digests_timeout_seconds).run()


def job_or_none(site: Site, vm: str) -> ResyncJob | None:
    """The VM's resync job, for `vmreplica status` (an unreadable one reads as none)."""
    try:
        return load_job(site.config.vm_folder(vm))
    except ConfigurationError:
        return None
