"""``vmreplica agent``: one long-running process per site, primary for some VMs, replica for others.

For each VM it is primary of, the agent seeds the replica (if not yet done), cuts and ships a
cycle every replication period (continuous mode: every second, or sooner once the change log
holds ``continuous_max_bytes``) if anything was written — an idle VM publishes nothing —
heartbeats every ``heartbeat_seconds`` and at once when a shipped burst of writes leaves nothing
waiting, and runs a resync when one is pending, beside the cycles (the VM keeps running). For
each VM it is replica of, it applies the journal as it arrives. New VMs (enabled here, or
discovered in the trust group's topics) are picked up while it runs. One VM's failure never
stops the others.

A ``--capture nbd`` VM's exports belong to the agent, not to one worker
(:mod:`~vmreplica.runtime.exports`): they stay up across every role change, capturing writes
while the VM is primary here and serving the images read-only otherwise.

Before it runs, :func:`vmreplica.runtime.folders.check_folders` and the listeners (metrics, NBD
over TCP) refuse a setting the agent cannot work with in one line that names the setting, the
problem and what to do.

About 800 lines: the loop and its supervision of the VMs' workers (start, retry, stop, role
changes, exports kept across them, the order of a planned failover, Kafka outages ridden out)
read as one piece. What stands alone has its own module: the NBD exports in
:mod:`~vmreplica.runtime.exports`, :mod:`~vmreplica.runtime.folders`,
:mod:`~vmreplica.runtime.resync_worker`, :mod:`~vmreplica.runtime.outage`, the hop relay in
:mod:`~vmreplica.runtime.extension`, and the shared timings in :mod:`~vmreplica.runtime.pacing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Final

import aiosqlite

from vmreplica.consumers.drill import FailoverDrill
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import (
    BrokerError,
    BrokerUnreachable,
    ConfigurationError,
    FencedError,
    ReplicationError,
    StorageFullError,
    SupersededError,
)
from vmreplica.failover import (
    carry_out,
    demote,
    follow_new_primary,
    follow_reverse,
    follow_takeover,
    promote,
    takes_over,
)
from vmreplica.failover.journal import pending_start, publish_pending
from vmreplica.failover.planned import check_planned, prepare_planned, resume_vm, stop_vm
from vmreplica.failover.requests import (
    CancelFailover,
    FailoverRequest,
    PlannedFailover,
    RemoveReplication,
    Resynchronize,
    planned_done,
    posted_request,
)
from vmreplica.failover.resync import accept_resync, cancel_resync
from vmreplica.failover.resync_job import load_job
from vmreplica.hypervisor import hypervisor_for
from vmreplica.journal.kafka import quiet_client_errors
from vmreplica.producers.app_consistent import AppConsistentSchedule
from vmreplica.producers.capture_front import CaptureFront
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.exports import SiteExports
from vmreplica.runtime.extension import HopRelay
from vmreplica.runtime.initial import awaits_import
from vmreplica.runtime.metrics import CycleStat, SiteMetrics, failure_reason
from vmreplica.runtime.outage import Backoff, PublishOutage
from vmreplica.runtime.pacing import DISCOVERY_SECONDS, HELD_SECONDS, RETRY_SECONDS
from vmreplica.runtime.resync_worker import RESYNC_CHECK_SECONDS, ResyncWorker
from vmreplica.runtime.settings import publish_pending_config
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.storage.mailbox import Mailbox
from vmreplica.storage.reserve import SpaceReserve
from vmreplica.storage.safefile import no_space

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT_SECONDS: Final = 5.0
"""A discovery Kafka does not answer (a black-holed link) is given up after this long, so that
the next one can start."""
REQUEST_POLL_SECONDS: Final = 0.25
"""How often the agent looks for failover requests and finished workers."""
METRICS_SECONDS: Final = 5.0
"""How often the Prometheus gauges are refreshed from the catalog."""
CONTINUOUS_TICK_SECONDS: Final = 1.0
"""Continuous replication looks for writes to ship every second."""
ALIVE_STAMP_SECONDS: Final = 2.0
"""How often the agent stamps the mailbox while it carries out a long request (well inside the
mailbox's ten seconds of liveness)."""
STOP_GRACE_SECONDS: Final = 20.0
"""On a stop, how long the workers get to end by themselves (a primary's final cycle) before
they are cancelled."""
PUBLISH_RETRY_SECONDS: Final = 2.0
"""While Kafka is away, a primary whose epoch is not yet in the journal (a failover with no
broker reachable) tries to publish it this often, and a replica to join its journal."""
SUSPENDED_POLL_SECONDS: Final = 1.0
"""How often a suspended replica looks whether it was resumed."""
CAPTURE_WAIT_SECONDS: Final = 30.0
"""How long a VM to resume (a planned failover refused after its stop, or cancelled) waits for
its worker to capture its writes again."""


class Agent:
    """Runs every VM of one :class:`Site` until stopped."""

    def __init__(self, site: Site, early_signals: list[int] | None = None) -> None:
        self.site = site
        self._early_signals = early_signals if early_signals is not None else []
        """Stop signals that arrived before :meth:`run` installed its handlers."""
        self.stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ended: dict[str, tuple[float, int, float]] = {}
        """When each VM's worker last ended, at which catalog generation, and how long it waits
        before it is started again at the same generation."""
        self._next_discovery = 0.0
        self._discovery: asyncio.Task[None] | None = None
        self._next_metrics = 0.0
        self.metrics = SiteMetrics(
            site.config.site, heartbeat_seconds=site.config.heartbeat_seconds
        )
        self.metrics_url: str | None = None
        """Where Prometheus scrapes this agent, once it runs (``metrics_port`` set)."""
        self.primaries: dict[str, PrimaryVm] = {}
        """Open primary VMs: a program capturing through the API writes to their ``capture``."""
        self.fronts: dict[str, CaptureFront] = {}
        """What captures each open primary's writes: its NBD exports, or its scanner."""
        self.exports = SiteExports(site.config)
        """The NBD exports of every ``--capture nbd`` VM this site holds, kept up across role
        changes: capturing writes while the VM is primary here, read-only (EPERM) otherwise."""
        self.mailbox = Mailbox(site.config.catalog_path)
        """Where the CLI leaves failover requests, and where the agent says it is alive."""
        self.resyncs: dict[str, ResyncWorker] = {}
        """The resync runner of each open primary."""
        self._backoff: dict[str, Backoff] = {}
        """Each VM's retry delays while its worker keeps ending on retriable errors."""
        self.reserve = SpaceReserve(site.config.root)
        """Space held back so that a full disk can still be recorded in the catalog."""
        self._retrying: dict[str, str] = {}
        """VMs whose worker ended on a retriable error, with it, until a new worker succeeds."""
        self._cut_off: str | None = ""
        """Why Kafka was last found unreachable; None while it answers ("": not known yet, so
        the first answer clears an outage an earlier run of the agent recorded)."""
        self._started: dict[str, tuple[int, VmRecord]] = {}
        """The catalog generation and record each VM's worker was last started with."""
        self._next_publish: dict[str, float] = {}
        """When each VM cut off from Kafka next tries again (to publish a pending epoch, or
        to join the journal)."""

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_client_errors(loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.stop)
        if self._early_signals:
            self.stop()
        config = self.site.config
        if config.metrics_port is not None:
            self.metrics_url = self.metrics.serve(config.metrics_port, config.metrics_address)
        try:
            await self.exports.start()
            log.info("agent of site %s started", config.site)
            if self.metrics_url is not None:
                log.info("metrics on %s", self.metrics_url)
            await self._run_until_stopped()
        finally:
            await self.exports.stop()
            await asyncio.to_thread(self.metrics.stop)

    async def _run_until_stopped(self) -> None:
        await self.mailbox.start()
        try:
            self.reserve.take()
            while not self.stopping.is_set():
                try:
                    await self.mailbox.agent_alive(self.site.config.site, os.getpid())
                    await self._refresh_metrics()
                    await self._carry_out_requests()
                    await self._start_new_workers()
                except (OSError, sqlite3.Error) as error:
                    problem = no_space(error)
                    if problem is None:
                        raise
                    # The VMs' workers report the full disk in their states; this loop only
                    # waits for room, its catalog writes being retried at the next turn.
                    if not self.reserve.release():
                        log.warning("the site's catalog cannot be written: %s", problem)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), REQUEST_POLL_SECONDS)
        finally:
            # Workers see ``stopping`` and end by themselves first: a primary ships what was
            # written before the stop. Only one that does not end in time is cancelled.
            if self._discovery is not None:
                self._discovery.cancel()
                await asyncio.gather(self._discovery, return_exceptions=True)
            tasks = list(self._tasks.values())
            if tasks and self.stopping.is_set():
                await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.mailbox.agent_gone(self.site.config.site)
            await self.mailbox.stop()
            log.info("agent of site %s stopped", self.site.config.site)

    async def _refresh_metrics(self) -> None:
        """Gauges from the catalog, and the cycles it recorded since the last refresh."""
        loop = asyncio.get_running_loop()
        if self.site.config.metrics_port is None or loop.time() < self._next_metrics:
            return
        self._next_metrics = loop.time() + METRICS_SECONDS
        catalog = self.site.catalog
        now = now_ms()
        records = await catalog.vms()
        outage = await self.mailbox.kafka_outage(self.site.config.site)
        for record in records:
            status = await vm_status(self.site, record, with_replica=False, outage=outage)
            position = await catalog.position(record.name)
            since = self.metrics.since_ms(record.name)
            if position is not None:  # the current cycle's row too: its cut time is the RPO's
                since = min(since, position.at_ms)
            stats = [CycleStat(*row) for row in await catalog.cycle_stats(record.name, since)]
            self.metrics.update(status, stats, position, now)
        self.metrics.retain(record.name for record in records)

    async def _failed(self, vm: str, reason: str, message: str) -> None:
        """A cycle or the VM's replication failed for ``reason``: counted in the metrics and
        logged in the catalog's event log, which the statistics count (a failure of the log
        itself is only logged: the VM's worker must not fail twice)."""
        self.metrics.failed(vm, reason)
        try:
            await self.site.catalog.record_failure(vm, reason, message)
        except sqlite3.Error as error:
            log.warning("VM %s: could not log the failure in the catalog: %s", vm, error)

    async def _stop_worker(self, vm: str) -> None:
        task = self._tasks.pop(vm, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _carry_out_requests(self) -> None:
        """Requests the CLI left in the mailbox. A failover needs its VM to itself; a resync
        is handed to the VM's running worker instead, as the VM keeps running through it.

        A request that cannot be read (a mistake, or a kind this version does not know) fails
        without stopping the VM's worker.
        """
        for posted in await self.mailbox.pending():
            alive = asyncio.create_task(self._stay_alive())
            try:
                request = posted_request(posted)
                result = await self._carry_out(request)
            except ConfigurationError as error:
                await self.mailbox.finish(posted.id, "failed", str(error))
                self.metrics.failover(posted.vm, posted.kind, "failed")
                log.error("VM %s: %s failed: %s", posted.vm, posted.kind, error)
            except ReplicationError as error:
                await self.mailbox.finish(posted.id, "refused", str(error))
                self.metrics.failover(posted.vm, posted.kind, "refused")
                log.error("VM %s: %s refused: %s", posted.vm, posted.kind, error)
            else:
                await self.mailbox.finish(posted.id, "done", result)
                self.metrics.failover(posted.vm, posted.kind, "done")
                log.info("VM %s: %s", posted.vm, result)
            finally:
                alive.cancel()
                await asyncio.gather(alive, return_exceptions=True)

    async def _stay_alive(self) -> None:
        """Stamp the mailbox while a request runs (a reverse waits for the old primary's
        report): a command started meanwhile must still see this agent, not do the work too."""
        while True:
            await asyncio.sleep(ALIVE_STAMP_SECONDS)
            await self.mailbox.agent_alive(self.site.config.site, os.getpid())

    async def _carry_out(self, request: FailoverRequest) -> str:
        if isinstance(request, PlannedFailover):
            return await self._planned(request)
        if not isinstance(request, Resynchronize):
            record = await self.site.catalog.vm(request.vm)
            resumes = isinstance(request, CancelFailover) and (
                record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER
            )
            await self._stop_worker(request.vm)
            result = await carry_out(self.site, request, resume=False)
            if isinstance(request, RemoveReplication):
                await self.exports.withdraw(request.vm)
            if resumes:
                await self._resume_when_captured(request.vm, "planned failover cancelled")
            return result
        vm = request.vm
        if request.cancel:
            job = load_job(self.site.config.vm_folder(vm))
            worker = self.resyncs.get(vm)
            if job is not None and job.phase != "sending" and worker is not None:
                await worker.stop()  # so that it cannot write the job again
            return (await cancel_resync(self.site, vm)).summary()
        job = await accept_resync(self.site, vm, request.site, not_before_ms=request.at_ms)
        return (
            f"{job.summary()}; this site's agent runs it while the VM keeps replicating: "
            f"`vmreplica status {vm}` shows its progress"
        )

    async def _discover(self) -> None:
        """Adopt newly published VMs; also how the agent learns that Kafka is (un)reachable.
        A task of its own: a broker that does not answer must not hold up the mailbox (a
        failover is asked for exactly then) or the agent's liveness stamp."""
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT_SECONDS):
                await self.site.discover()
        except BrokerUnreachable as error:
            await self._unreachable(error)
        except ReplicationError as error:
            log.warning("discovery failed: %s", error)
        except TimeoutError:
            await self._unreachable(
                BrokerUnreachable(
                    f"discovering VMs: Kafka did not answer within {DISCOVERY_TIMEOUT_SECONDS:.0f} "
                    "s. Check that the brokers are up and this site reaches them."
                )
            )
        else:
            await self._reachable()

    async def _planned(self, request: PlannedFailover) -> str:
        """Planned failover, in this order: the target is checked (a bad one leaves the VM
        as it was); the VM is stopped through its hypervisor adapter while its worker still
        captures, so every write it made is journaled; only then does the worker stop (the
        exports turn read-only) and the final cycle ship. A refusal after the stop resumes the
        VM once its worker captures again."""
        vm = request.vm
        target = await check_planned(self.site, vm, request.target)
        await stop_vm(self.site, vm)
        await self._stop_worker(vm)
        try:
            prepared = await prepare_planned(
                self.site, vm, request.reverse, request.start, request.verify, target
            )
        except ReplicationError:
            await self._resume_when_captured(vm, "the planned failover failed after the VM stopped")
            raise
        return planned_done(prepared)

    async def _resume_when_captured(self, vm: str, why: str) -> None:
        """Resume a stopped VM, once its worker captures its writes again (a VM resumed
        before would meet exports that refuse its writes)."""
        await self._start_new_workers()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CAPTURE_WAIT_SECONDS
        while vm not in self.fronts:
            if loop.time() > deadline:
                log.error(
                    "VM %s: %s, but its capture did not restart within %g s; not resuming it. "
                    "Operator action: `vmreplica status %s`, then resume it by hand",
                    vm, why, CAPTURE_WAIT_SECONDS, vm,
                )  # fmt: skip
                return
            await asyncio.sleep(0.05)
        await resume_vm(self.site, vm, why)

    async def _start_new_workers(self) -> None:
        loop = asyncio.get_running_loop()
        discovering = self._discovery is not None and not self._discovery.done()
        if loop.time() >= self._next_discovery and not discovering:
            self._next_discovery = loop.time() + DISCOVERY_SECONDS
            self._discovery = asyncio.create_task(self._discover(), name="discovery")
        # One query for every VM; a VM's record is read only when it has no worker running.
        for name, generation in (await self.site.catalog.generations()).items():
            task = self._tasks.get(name)
            if task is not None and not task.done():
                if not await self._settings_changed(name, generation):
                    continue
                await self._stop_worker(name)  # started again below, with the new settings
            ended, seen, wait = self._ended.get(name, (0.0, -1, 0.0))
            if task is not None and seen == generation and loop.time() - ended < wait:
                continue  # ended on its own: retried when its role changes, or later
            # Read after the generation: a worker that ended since (a failover that just
            # changed the role) must not be followed by one for the old role.
            record = await self.site.catalog.find_vm(name)
            if record is None:
                continue  # removed since the listing
            self._ended[record.name] = (loop.time() + 10**9, generation, RETRY_SECONDS)
            self._started[record.name] = (generation, record)
            work = self._primary if record.role == "primary" else self._replica
            self._tasks[record.name] = asyncio.create_task(
                self._guarded(record, work), name=f"vm-{record.name}"
            )

    async def _settings_changed(self, vm: str, generation: int) -> bool:
        """`vmreplica set` changed the settings of ``vm``'s running primary worker (the
        generation moved, the role did not): it is to be started again with them. Read only
        when the generation moved, so a steady agent reads no record."""
        started = self._started.get(vm)
        if started is None or started[0] == generation:
            return False
        record = await self.site.catalog.find_vm(vm)
        self._started[vm] = (generation, started[1])
        if record is None or record.role != "primary" or started[1].role != "primary":
            return False
        if (record.settings, record.partner_site, record.disks) == (
            started[1].settings,
            started[1].partner_site,
            started[1].disks,
        ):
            return False
        log.info("VM %s: its settings changed; its worker starts again with them", vm)
        return True

    async def _unreachable(self, error: BrokerUnreachable) -> None:
        """Kafka cannot be reached: `status` says so (health, with the reason) from now on."""
        if not self._cut_off:
            log.warning("Kafka unreachable: %s", error)
        self._cut_off = str(error)
        await self.mailbox.kafka_unreachable(self.site.config.site, str(error))

    async def _reachable(self) -> None:
        if self._cut_off is not None:
            log.info("Kafka reachable again")
            self._cut_off = None
            await self.mailbox.kafka_reachable(self.site.config.site)

    async def _superseded(self, record: VmRecord, error: SupersededError) -> None:
        """A newer epoch exists: a prepared primary follows the takeover, a returning one
        stands down and reports what diverged."""
        log.warning("VM %s: %s", record.name, error)
        await self.exports.serve_fenced(record, str(error))  # read-only at once, before the report
        if record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER:
            await follow_takeover(self.site, record.name)
            self.metrics.failover(record.name, "follow")
        else:
            diverged = await demote(self.site, record.name, error.start, error.offset)
            self.metrics.failover(record.name, "stand_down")
            log.warning(
                "VM %s: now a replica of %s; %d bytes diverged",
                record.name,
                error.start.primary_site,
                diverged,
            )

    async def _guarded(self, record: VmRecord, work: Callable[[VmRecord], Awaitable[None]]) -> None:
        """Run a VM's worker; on an error, record it in the VM's state (health critical, the
        message as reason) and say how long until the worker is started again: a retriable
        error (Kafka away, a full disk) after a back-off that doubles up to
        :data:`RETRY_SECONDS` and starts afresh once a worker ran that long; any other after
        :data:`HELD_SECONDS`, or when the VM's role changes."""
        wait = RETRY_SECONDS
        loop = asyncio.get_running_loop()
        started = loop.time()
        backoff = self._backoff.setdefault(record.name, Backoff(longest=RETRY_SECONDS))
        try:
            await work(record)
        except asyncio.CancelledError:
            raise
        except SupersededError as error:
            await self._superseded(record, error)
        except BrokerUnreachable as error:  # not the VM's fault: its state stays, health says
            if record.role == "primary":
                await self.exports.withdraw(record.name)
            self.metrics.failed(record.name, "network")
            await self._unreachable(error)
            log.error("VM %s: %s", record.name, error)
        except ReplicationError as error:
            if not isinstance(error, FencedError):  # fenced: no longer primary, stay read-only
                await self.exports.withdraw(record.name)
            if isinstance(error, StorageFullError):
                self.reserve.release()  # room to record the state, on the full file system
            await self._failed(record.name, failure_reason(error), str(error))
            if error.retriable:
                if loop.time() - started > RETRY_SECONDS:
                    backoff.reset()
                wait = backoff.next_delay()
                self._retrying[record.name] = str(error)
            else:
                wait = HELD_SECONDS
            try:
                await self.site.catalog.set_state(record.name, ReplicationState.ERROR, str(error))
            except aiosqlite.Error as failure:  # a full disk may refuse even this
                log.warning("VM %s: could not record its state: %s", record.name, failure)
            log.error(
                "VM %s: %s%s", record.name, error, f" (retried in {wait:.0f} s)" * error.retriable
            )
        except Exception:  # a bug: said with its traceback; the VM is tried again later
            await self.exports.withdraw(record.name)
            log.exception("VM %s: the worker failed unexpectedly", record.name)
        finally:
            ended = self._ended.get(record.name)
            if ended is not None:
                self._ended[record.name] = (asyncio.get_running_loop().time(), ended[1], wait)

    async def _resumed(self, vm: str) -> None:
        """The VM's worker, started again after a retriable error, did its work: its state,
        still the error's, is replicating again."""
        error = self._retrying.pop(vm, None)
        if error is None:
            return
        self._backoff.pop(vm, None)
        self.reserve.take()
        record = await self.site.catalog.vm(vm)
        if record.state is ReplicationState.ERROR:
            await self.site.catalog.set_state(
                vm, ReplicationState.REPLICATING, f"resumed by itself after: {error}"
            )
            log.info("VM %s: resumed by itself", vm)

    async def _replica(self, record: VmRecord) -> None:
        """Apply the journal; serve a test failover if asked; take over when a planned failover
        names this site; follow another replica site that took over. A VM seeded on external
        media waits, untouched, until `vmreplica initial import` has imported its seed."""
        if awaits_import(record):
            log.info("VM %s: waiting for `vmreplica initial import %s DIR`", *(record.name,) * 2)
        while awaits_import(record):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), REQUEST_POLL_SECONDS)
            found = None if self.stopping.is_set() else await self.site.catalog.find_vm(record.name)
            if found is None:
                return
            record = found
        async with await self.site.replica(record, connect=False) as replica:
            await self.exports.serve_replica(record)
            replica.held = lambda: self._suspended(record.name)
            drill = FailoverDrill(self.site.catalog, replica)
            hop = HopRelay(self.site, record.name)
            try:
                while not self.stopping.is_set() and not replica.stopped:
                    await drill.poll()  # a test failover needs no broker
                    if replica.holding:  # `vmreplica suspend` here: look again in a while
                        await self._pause(SUSPENDED_POLL_SECONDS)
                    if not await self._connected(replica):
                        continue
                    try:
                        cursor = replica.materializer.cursor
                        epoch, before = cursor.epoch, cursor.next_offset
                        await self._apply(replica)
                        if replica.violation is None:
                            await self._resumed(record.name)
                        if replica.materializer.cursor.epoch != epoch:
                            await self._follow_new_primary(record.name, before)
                        if replica.between_cycles:  # its seed reads the images
                            await hop.poll()
                        if await self._prepared_and_caught_up(replica):
                            break
                    except BrokerUnreachable as error:
                        await self._unreachable(error)
                        await replica.disconnect()
            finally:
                await drill.stop()
                await hop.stop()
            prepared = replica.materializer.prepared
        if prepared is not None:
            start = await promote(self.site, record.name, prepared=prepared)
            self.metrics.failover(record.name, "takeover")
            log.info("VM %s: took over as primary in epoch %d", record.name, start.epoch)

    async def _suspended(self, vm: str) -> bool:
        """The operator suspended this replica (Suspend-VMReplication at the replica): it
        applies nothing until resumed — test failovers, points and exports still work, and the
        primary goes on shipping into the journal, which keeps the cycles for its retention."""
        return (await self.site.catalog.vm(vm)).state is ReplicationState.SUSPENDED

    async def _connected(self, replica: ReplicaVm) -> bool:
        """Join the journal if not yet joined; False (after a pause) while Kafka is away: the
        replica then serves its images and test failovers, and applies nothing."""
        if replica.connected:
            return True
        loop = asyncio.get_running_loop()
        due = self._next_publish.get(replica.name, 0.0)
        if loop.time() >= due:
            self._next_publish[replica.name] = loop.time() + PUBLISH_RETRY_SECONDS
            try:
                await replica.connect()
                return True
            except BrokerUnreachable as error:
                await self._unreachable(error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), REQUEST_POLL_SECONDS)
        return False

    async def _follow_new_primary(self, vm: str, start_offset: int) -> None:
        """This replica applied a new epoch: if another replica site took over, follow it."""
        start = await follow_new_primary(self.site, vm, start_offset)
        if start is None:
            return
        log.info(
            "VM %s: site %s took over in epoch %d; this replica follows it",
            vm,
            start.primary_site,
            start.epoch,
        )
        await self.exports.serve_replica(await self.site.catalog.vm(vm))

    async def _apply(self, replica: ReplicaVm) -> None:
        """One step of the replica; the time it spent applying goes to the cycles it applied,
        and a journal violation it met is counted as a failure once."""
        cycle, spent, violation = (
            replica.materializer.cursor.cycle,
            replica.apply_seconds,
            replica.violation,
        )
        await replica.step()
        if replica.violation is not None and replica.violation is not violation:
            await self._failed(replica.name, "journal", str(replica.violation))
        applied = replica.materializer.cursor.cycle - cycle
        if applied > 0:
            self.metrics.applied(replica.name, replica.apply_seconds - spent, applied)

    async def _prepared_and_caught_up(self, replica: ReplicaVm) -> bool:
        """The primary prepared a planned failover to this site, and nothing after it
        cancelled it (the VM's other replica sites only follow)."""
        prepared = replica.materializer.prepared
        return (
            prepared is not None
            and takes_over(prepared, self.site.config.site)
            and await replica.reader.position() >= await replica.reader.end_offset()
        )

    async def _primary(self, record: VmRecord) -> None:
        if record.state in (
            ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
            ReplicationState.FAILED_OVER,
        ):
            if (
                record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER
                or await self.site.catalog.failover_point(record.name) is None
            ):
                await self.exports.serve(
                    record,
                    (
                        f"VM {record.name!r} is being handed over by site {self.site.config.site} "
                        f"({record.state.value}); write to the new primary's exports"
                    ),
                )
            if await self._follow(record):
                return
        unpublished = await self._publish_epoch(record.name)
        async with self.site.primary(record, connect=not unpublished) as primary:
            # Started only now, and taken by the capture before anything else runs: a client
            # never finds the socket of an opening primary serving nothing or read-only.
            exports = await self.exports.of(record)
            async with CaptureFront(primary, self.site.config, self.exports.tcp, exports) as front:
                await self._capture(record, primary, front)

    async def _capture(self, record: VmRecord, primary: PrimaryVm, front: CaptureFront) -> None:
        """The primary's work while its capture front runs: seed, then cycles."""
        self.primaries[record.name] = primary
        self.fronts[record.name] = front
        resync = self.resyncs[record.name] = ResyncWorker(self.site, primary)
        try:
            await publish_pending_config(self.site, primary)  # `vmreplica set` changed them
            if record.state in (
                ReplicationState.READY_FOR_INITIAL_REPLICATION,
                ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
            ):
                while await self.site.catalog.seed_held(record.name):  # `initial stop`
                    if self.stopping.is_set():
                        return
                    await self._pause(1.0)
                await front.initial_replication()
            await self._cycles(primary, resync)
        finally:
            await resync.stop()
            del self.resyncs[record.name]
            del self.primaries[record.name]
            del self.fronts[record.name]

    async def _publish_epoch(self, vm: str) -> bool:
        """Publish the epoch a failover left pending for ``vm`` (no broker answered then);
        True while it is still pending. The VM is served and captured meanwhile, shipping
        nothing: an old primary that reaches the cluster first is fenced once it is out.

        :raises SupersededError: another site started the same or a newer epoch meanwhile.
        """
        start = await pending_start(self.site, vm)
        if start is None:
            return False
        self._next_publish[vm] = asyncio.get_running_loop().time() + PUBLISH_RETRY_SECONDS
        try:
            offset = await publish_pending(self.site, vm)
        except BrokerUnreachable as error:
            await self._unreachable(error)
            return True
        await self._reachable()
        log.warning(
            "VM %s: epoch %d published at journal offset %s; the old primary (%s) is fenced "
            "when it next reaches the cluster",
            vm,
            start.epoch,
            offset,
            (await self.site.catalog.vm(vm)).partner_site,
        )
        return False

    async def _replicate(self, primary: PrimaryVm, app_consistent: bool = False) -> None:
        """One cycle, through the VM's capture front (scan, hooks, off-loop copies) if open;
        ``app_consistent``: with the guest frozen through its hypervisor adapter (a failed
        freeze is counted, and the cycle is cut crash-consistent all the same)."""
        front = self.fronts.get(primary.name)
        if front is not None:
            checks = primary.checks
            quiesce = hypervisor_for(self.site.config, primary.record) if app_consistent else None
            shipped = await front.cycle(quiesce)
            if primary.checks == checks:  # a cut hook failed: the front logged it, no cycle
                await self._failed(primary.name, "hook", "a cut hook failed: the cycle was skipped")
            if front.freeze_error is not None:
                await self._failed(
                    primary.name,
                    "freeze",
                    f"the guest's file systems were not frozen ({front.freeze_error}): the cycle "
                    "was cut crash-consistent",
                )
        else:
            shipped = await primary.replicate(app_consistent)
        for cycle in shipped:
            self.metrics.written(primary.name, cycle.bytes_written)

    async def _follow(self, record: VmRecord) -> bool:
        """A prepared primary waits for its replica to take over; True when it did. One that
        stood down (failed over, planned) becomes a replica once the new primary reverses."""
        if record.state is ReplicationState.FAILED_OVER:
            if await self.site.catalog.failover_point(record.name) is not None:
                return False  # the new primary of an unplanned failover: it captures
            if await follow_reverse(self.site, record.name):
                log.info("VM %s: the new primary reversed; now its replica", record.name)
            return True
        while not self.stopping.is_set():
            if await follow_takeover(self.site, record.name):
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 1.0)
        return True

    async def primary(self, vm: str, timeout_seconds: float = 30.0) -> PrimaryVm:
        """The open primary of ``vm`` once the agent has started it (for API capture)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while vm not in self.primaries:
            if loop.time() > deadline:
                raise TimeoutError(f"the agent did not open VM {vm!r} as primary")
            await asyncio.sleep(0.05)
        return self.primaries[vm]

    async def _cycles(self, primary: PrimaryVm, resync: ResyncWorker) -> None:
        """Each period, a cycle if anything waits to ship (:meth:`PrimaryVm.replicate`; an
        idle VM publishes nothing); a heartbeat every ``heartbeat_seconds``, and one as soon as
        a shipped burst leaves nothing waiting, so the replica knows at once that it holds
        every write (its RPO and health then rest on the heartbeats, not on cycles); and the
        VM's resync worker, polled beside them."""
        settings = primary.record.settings
        period = settings.frequency_seconds or CONTINUOUS_TICK_SECONDS
        loop = asyncio.get_running_loop()
        next_cut = loop.time() + period
        next_beat = loop.time()
        outage = PublishOutage(self.site.catalog, primary)
        schedule = AppConsistentSchedule(
            self.site.config.vm_folder(primary.name), settings.app_consistent_hours
        )
        while not self.stopping.is_set():
            if not primary.connected:  # its epoch waits for a broker: capture only
                due = self._next_publish.get(primary.name, 0.0)
                if loop.time() >= due and not await self._publish_epoch(primary.name):
                    await primary.connect()
                    await publish_pending_config(self.site, primary)
                    next_beat = loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 0.2)
                continue
            resync.poll()
            await resync.watch()
            now = loop.time()
            try:
                if outage.ongoing:  # the capture goes on; cycles wait for Kafka
                    if not outage.due() or not await outage.retry():
                        await self._pause(min(outage.retry_at - now, RESYNC_CHECK_SECONDS))
                        continue
                    next_cut = next_beat = now
                app_consistent = schedule.due(now_ms())
                due = (
                    app_consistent
                    or now >= next_cut
                    or (
                        settings.frequency_seconds == 0
                        and primary.capture.log.segment_bytes >= settings.continuous_max_bytes
                    )
                )
                if due:
                    if await self._shipping(primary):
                        if app_consistent:
                            schedule.attempted(now_ms())
                        await self._replicate(primary, app_consistent)
                    next_cut = now + period
                if now >= next_beat or primary.idle_unannounced:
                    await primary.heartbeat()
                    next_beat = loop.time() + self.site.config.heartbeat_seconds
            except BrokerError as error:  # a FencedError is raised again: not an outage
                if not outage.ongoing:
                    self.metrics.failed(primary.name, failure_reason(error))
                if isinstance(error, BrokerUnreachable):
                    await self._unreachable(error)  # `status` says so, for every VM
                await outage.failed(error)
                continue
            except (OSError, sqlite3.Error) as error:
                problem = no_space(error)
                if problem is None:
                    raise
                folder = str(primary.capture.log.folder)
                await outage.failed(
                    StorageFullError(primary.name, folder, "cutting a cycle", problem)
                )
                continue
            await self._resumed(primary.name)
            wait = max(0.05, min(next_cut, next_beat, now + RESYNC_CHECK_SECONDS) - loop.time())
            if settings.frequency_seconds == 0:
                wait = min(wait, 0.1)
            await self._pause(wait)
        if not outage.ongoing and await self._shipping(primary):
            await self._replicate(primary)  # ship what was written before the stop

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the agent is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.05, seconds))

    async def _shipping(self, primary: PrimaryVm) -> bool:
        """A failed-over primary captures but ships nothing until it is reversed, a suspended
        one until it is resumed, one whose epoch is not yet published until it is."""
        state = (await self.site.catalog.vm(primary.name)).state
        return primary.connected and state not in (
            ReplicationState.FAILED_OVER,
            ReplicationState.FAILED_OVER_WAITING_COMPLETION,
            ReplicationState.SUSPENDED,
        )
