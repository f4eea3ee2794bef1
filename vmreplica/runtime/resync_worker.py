"""The primary side of a resync as the agent runs it: beside the VM's cycles, resumed from its
job file after a stop, and started by itself when a replica says it needs one."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError, ResyncRefused
from vmreplica.failover.resync import ResyncRun, accept_resync
from vmreplica.failover.resync_job import ResyncBusy, load_job, running
from vmreplica.journal.kafka import JournalReader
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.pacing import HELD_SECONDS, RETRY_SECONDS
from vmreplica.runtime.site import Site
from vmreplica.schemas.events import ReplicaPosition, ResyncRequest

log = logging.getLogger(__name__)

RESYNC_CHECK_SECONDS: Final = 1.0
"""How often a primary worker looks for a pending resync job."""

RESYNC_WATCH_SECONDS: Final = 5.0
"""How often a primary reads its status topic for a replica that says it needs a resync."""

STATUS_TAIL_RECORDS: Final = 500
"""A primary worker starts reading its status topic this many records back: a replica waiting
for a resync repeats its position every minute, so it is among them."""


class ResyncWorker:
    """Runs a primary VM's pending resync (:mod:`vmreplica.failover.resync`) beside its cycles,
    and starts one when a replica says it needs it.

    The job file says what is pending; a job cut short (the worker stopped, a broker away)
    resumes from it at the next poll, or after :data:`RETRY_SECONDS` on an error.
    """

    def __init__(self, site: Site, primary: PrimaryVm) -> None:
        self.site = site
        self.primary = primary
        self.folder = site.config.vm_folder(primary.name)
        self.task: asyncio.Task[None] | None = None
        self.next_check = 0.0
        self.next_watch = 0.0
        self.status: JournalReader | None = None
        self.positions: dict[str, ReplicaPosition] = {}
        """The latest position each site reported on the status topic."""
        self.reasons: dict[str, str] = {}
        """Why each site last asked for a resync."""

    async def watch(self) -> None:
        """A replica site whose latest position says "resynchronization required" (a journal
        violation stopped it): resync it (``auto_resync``), or turn this VM's state, and so its
        health, critical with what to do. Errors are logged: the cycles go on."""
        loop = asyncio.get_running_loop()
        if loop.time() < self.next_watch:
            return
        self.next_watch = loop.time() + RESYNC_WATCH_SECONDS
        vm = self.primary.name
        try:
            record = await self.site.catalog.vm(vm)
            if record.state is not ReplicationState.REPLICATING:
                return  # resynchronizing, or the need is known already
            await self._read_status()
            job = load_job(self.folder)
            if job is not None and job.active:
                return
            for target in (record.partner_site, *record.settings.also_replicate_to):
                position = self.positions.get(target)
                if (
                    position is None
                    or position.state != ReplicationState.RESYNCHRONIZATION_REQUIRED.value
                ):
                    continue
                if (
                    job is not None
                    and job.target == target
                    and job.epoch is not None
                    and position.epoch < job.epoch
                ):
                    continue  # said before the last resync of it was applied
                reason = self.reasons.get(target, "it stopped at a journal violation")
                # A site that never applied a cycle asks for its first copy: a seed, always due.
                if record.settings.auto_resync or position.offset < 0:
                    started = await accept_resync(
                        self.site,
                        vm,
                        target,
                        f"automatic: {target} needs it ({reason})",
                        automatic=True,
                    )
                    log.warning("VM %s: %s", vm, started.summary())
                else:
                    await self.site.catalog.set_state(
                        vm,
                        ReplicationState.RESYNCHRONIZATION_REQUIRED,
                        f"replica site {target} needs a resynchronization ({reason}); "
                        f"automatic resync is off for this VM: run `vmreplica resync {vm}`",
                    )
                    log.error(
                        "VM %s: replica site %s needs a resynchronization: %s", vm, target, reason
                    )
                return
        except ReplicationError as error:
            log.warning("VM %s: could not check its replicas for a resync: %s", vm, error)

    async def _read_status(self) -> None:
        """What the status topic says since the last look (at first, its tail)."""
        if self.status is None:
            reader = JournalReader(self.site.connection, self.site.status_topic(self.primary.name))
            await reader.start()
            self.status = reader
            reader.seek(max(0, await reader.end_offset() - STATUS_TAIL_RECORDS))
        for message in await self.status.fetch(0.2):
            try:
                event = await self.site.trusted_status(
                    self.primary.name, message.offset, message.value
                )
            except ReplicationError:
                continue  # not ours to judge here; the status command shows what it can
            if isinstance(event, ReplicaPosition):
                self.positions[event.site] = event
            elif isinstance(event, ResyncRequest) and event.disk is None:
                self.reasons[event.site] = event.reason

    def poll(self) -> None:
        """Start the pending job if none runs; cheap enough to call every loop turn."""
        loop = asyncio.get_running_loop()
        if (self.task is not None and not self.task.done()) or loop.time() < self.next_check:
            return
        self.task = None
        self.next_check = loop.time() + RESYNC_CHECK_SECONDS
        try:
            job = load_job(self.folder)
        except ConfigurationError as error:
            log.error("VM %s: %s", self.primary.name, error)
            self.next_check = loop.time() + HELD_SECONDS
            return
        if job is not None and job.active:
            self.task = asyncio.create_task(self._run(), name=f"resync-{self.primary.name}")

    async def _run(self) -> None:
        vm = self.primary.name
        try:
            with running(self.folder):
                job = await ResyncRun(self.site, self.primary).run()
            log.info("VM %s: %s", vm, job.summary())
        except ResyncBusy as busy:  # a `vmreplica resync` run while no agent was
            log.info("VM %s: %s; looking again in %.0f s", vm, busy, RETRY_SECONDS)
            self.next_check = asyncio.get_running_loop().time() + RETRY_SECONDS
        except ResyncRefused as refusal:
            log.error("VM %s: resync refused: %s", vm, refusal)
        except ReplicationError as error:
            log.warning(
                "VM %s: resync interrupted, retried in %.0f s: %s", vm, RETRY_SECONDS, error
            )
            self.next_check = asyncio.get_running_loop().time() + RETRY_SECONDS
        except Exception:  # a bug must not take the VM's cycles down with it
            log.exception("VM %s: resync failed; retried in %.0f s", vm, HELD_SECONDS)
            self.next_check = asyncio.get_running_loop().time() + HELD_SECONDS

    async def stop(self) -> None:
        """Cancel a running job (it resumes from its file); a second call is harmless."""
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.status is not None:
            status, self.status = self.status, None
            await status.stop()
