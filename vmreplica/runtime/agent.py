"""``vmreplica agent``: one long-running process per site, primary for some VMs, replica for others.

For each VM it is primary of, the agent seeds the replica (if not yet done), cuts and ships a
cycle every replication period (continuous mode: every second, or sooner once the change log
holds ``continuous_max_bytes``) if anything was written — an idle VM publishes nothing —
heartbeats every ``heartbeat_seconds`` and at once when a shipped burst of writes leaves nothing
waiting, and runs a resync when one is pending, beside the cycles (the VM keeps running). For
each VM it is replica of, it applies the journal as it arrives. New VMs (enabled here, or
discovered in the trust group's topics) are picked up while it runs. One VM's failure never
stops the others.

A ``--capture nbd`` VM's exports belong to the agent, not to one worker: they stay up across
every role change, capturing writes while the VM is primary here and serving the images
read-only (writes refused with EPERM) otherwise, so the new primary of a failover serves the
same export names and the old one still answers its hypervisor.

Before it runs, :func:`vmreplica.runtime.folders.check_folders` and the listeners (metrics, NBD
over TCP) refuse a setting the agent cannot work with in one line that names the setting, the
problem and what to do.

About 560 lines: the loop and its supervision of the VMs' workers (start, retry, stop, role
changes, exports kept across them) read as one piece. What stands alone has its own module:
:mod:`~vmreplica.runtime.folders`, :mod:`~vmreplica.runtime.resync_worker`, the hop relay in
:mod:`~vmreplica.runtime.extension`, and the shared timings in :mod:`~vmreplica.runtime.pacing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from vmreplica.config import cannot_listen
from vmreplica.consumers.drill import FailoverDrill
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import (
    ConfigurationError,
    FencedError,
    ReplicationError,
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
from vmreplica.failover.planned import check_planned
from vmreplica.failover.requests import (
    FailoverRequest,
    PlannedFailover,
    Resynchronize,
    posted_request,
)
from vmreplica.failover.resync import accept_resync, cancel_resync
from vmreplica.failover.resync_job import load_job
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture_front import CaptureFront
from vmreplica.producers.nbd_exports import VmExports, socket_path
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.extension import HopRelay
from vmreplica.runtime.metrics import CycleStat, SiteMetrics, failure_reason
from vmreplica.runtime.pacing import DISCOVERY_SECONDS, HELD_SECONDS, RETRY_SECONDS
from vmreplica.runtime.resync_worker import RESYNC_CHECK_SECONDS, ResyncWorker
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.storage.mailbox import Mailbox

log = logging.getLogger(__name__)

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
        self._next_metrics = 0.0
        self.metrics = SiteMetrics(site.config.site)
        self.metrics_url: str | None = None
        """Where Prometheus scrapes this agent, once it runs (``metrics_port`` set)."""
        self.primaries: dict[str, PrimaryVm] = {}
        """Open primary VMs: a program capturing through the API writes to their ``capture``."""
        self.fronts: dict[str, CaptureFront] = {}
        """What captures each open primary's writes: its NBD exports, or its scanner."""
        self.exports: dict[str, VmExports] = {}
        """The NBD exports of every ``--capture nbd`` VM this site holds, kept up across role
        changes: capturing writes while the VM is primary here, read-only (EPERM) otherwise."""
        self.nbd_tcp: NbdServer | None = None
        """The loopback TCP listener for every NBD export (``nbd_tcp_port``), if configured."""
        self.mailbox = Mailbox(site.config.catalog_path)
        """Where the CLI leaves failover requests, and where the agent says it is alive."""
        self.resyncs: dict[str, ResyncWorker] = {}
        """The resync runner of each open primary."""

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.stop)
        if self._early_signals:
            self.stop()
        config = self.site.config
        if config.metrics_port is not None:
            self.metrics_url = self.metrics.serve(config.metrics_port, config.metrics_address)
        try:
            await self._start_nbd_tcp()
            log.info("agent of site %s started", config.site)
            if self.metrics_url is not None:
                log.info("metrics on %s", self.metrics_url)
            await self._run_until_stopped()
        finally:
            if self.nbd_tcp is not None:
                await self.nbd_tcp.stop()
            await asyncio.to_thread(self.metrics.stop)

    async def _run_until_stopped(self) -> None:
        await self.mailbox.start()
        try:
            while not self.stopping.is_set():
                await self.mailbox.agent_alive(self.site.config.site, os.getpid())
                await self._refresh_metrics()
                await self._carry_out_requests()
                await self._start_new_workers()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), REQUEST_POLL_SECONDS)
        finally:
            # Workers see ``stopping`` and end by themselves first: a primary ships what was
            # written before the stop. Only one that does not end in time is cancelled.
            tasks = list(self._tasks.values())
            if tasks and self.stopping.is_set():
                await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for exports in self.exports.values():
                await exports.stop()
            self.exports.clear()
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
        for record in records:
            status = await vm_status(self.site, record, with_replica=False)
            position = await catalog.position(record.name)
            since = self.metrics.since_ms(record.name)
            if position is not None:  # the current cycle's row too: its cut time is the RPO's
                since = min(since, position.at_ms)
            stats = [CycleStat(*row) for row in await catalog.cycle_stats(record.name, since)]
            self.metrics.update(status, stats, position, now)
        self.metrics.retain(record.name for record in records)

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
        if isinstance(request, PlannedFailover):  # a bad target leaves the VM capturing
            await check_planned(self.site, request.vm, request.target)
        if not isinstance(request, Resynchronize):
            await self._stop_worker(request.vm)
            return await carry_out(self.site, request)
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

    async def _start_new_workers(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_discovery:
            self._next_discovery = loop.time() + DISCOVERY_SECONDS
            try:
                await self.site.discover()
            except ReplicationError as error:
                log.warning("discovery failed: %s", error)
        # One query for every VM; a VM's record is read only when it has no worker running.
        for name, generation in (await self.site.catalog.generations()).items():
            task = self._tasks.get(name)
            if task is not None and not task.done():
                continue
            ended, seen, wait = self._ended.get(name, (0.0, -1, 0.0))
            if task is not None and seen == generation and loop.time() - ended < wait:
                continue  # ended on its own: retried when its role changes, or later
            # Read after the generation: a worker that ended since (a failover that just
            # changed the role) must not be followed by one for the old role.
            record = await self.site.catalog.find_vm(name)
            if record is None:
                continue  # removed since the listing
            self._ended[record.name] = (loop.time() + 10**9, generation, RETRY_SECONDS)
            work = self._primary if record.role == "primary" else self._replica
            self._tasks[record.name] = asyncio.create_task(
                self._guarded(record, work), name=f"vm-{record.name}"
            )

    async def _superseded(self, record: VmRecord, error: SupersededError) -> None:
        """A newer epoch exists: a prepared primary follows the takeover, a returning one
        stands down and reports what diverged."""
        log.warning("VM %s: %s", record.name, error)
        await self._serve_fenced(record, str(error))  # read-only at once, before the report
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
        wait = RETRY_SECONDS
        try:
            await work(record)
        except asyncio.CancelledError:
            raise
        except SupersededError as error:
            await self._superseded(record, error)
        except ReplicationError as error:
            if not isinstance(error, FencedError):  # fenced: no longer primary, stay read-only
                await self._withdraw(record.name)
            self.metrics.failed(record.name, failure_reason(error))
            await self.site.catalog.set_state(record.name, ReplicationState.ERROR, str(error))
            log.error("VM %s: %s", record.name, error)
            if not error.retriable:
                wait = HELD_SECONDS
        except Exception:  # a bug: said with its traceback; the VM is tried again later
            await self._withdraw(record.name)
            log.exception("VM %s: the worker failed unexpectedly", record.name)
        finally:
            ended = self._ended.get(record.name)
            if ended is not None:
                self._ended[record.name] = (asyncio.get_running_loop().time(), ended[1], wait)

    async def _replica(self, record: VmRecord) -> None:
        """Apply the journal; serve a test failover if asked; take over when a planned failover
        names this site; follow another replica site that took over."""
        async with await self.site.replica(record) as replica:
            await self._serve_replica(record)
            drill = FailoverDrill(self.site.catalog, replica)
            hop = HopRelay(self.site, record.name)
            try:
                while not self.stopping.is_set() and not replica.stopped:
                    cursor = replica.materializer.cursor
                    epoch, before = cursor.epoch, cursor.next_offset
                    await self._apply(replica)
                    if replica.materializer.cursor.epoch != epoch:
                        await self._follow_new_primary(record.name, before)
                    await drill.poll()
                    await hop.poll()
                    if await self._prepared_and_caught_up(replica):
                        break
            finally:
                await drill.stop()
                await hop.stop()
            prepared = replica.materializer.prepared
        if prepared is not None:
            start = await promote(self.site, record.name, prepared=prepared)
            self.metrics.failover(record.name, "takeover")
            log.info("VM %s: took over as primary in epoch %d", record.name, start.epoch)

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
        await self._serve_replica(await self.site.catalog.vm(vm))

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
            self.metrics.failed(replica.name, "journal")
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

    async def _serve_replica(self, record: VmRecord) -> None:
        await self._serve_fenced(
            record,
            (
                f"VM {record.name!r} is a replica at site {self.site.config.site}; its primary is "
                f"site {record.partner_site}, whose exports take the VM's writes"
            ),
        )

    async def _serve_fenced(self, record: VmRecord, reason: str) -> None:
        """Serve the images read-only; failing to (a socket path too long, taken) is logged,
        and never stops replication or a failover."""
        try:
            await self._serve(record, reason)
        except (ConfigurationError, OSError) as error:
            log.warning("VM %s: not serving its images over NBD: %s", record.name, error)

    async def _exports(self, record: VmRecord) -> VmExports | None:
        """The NBD exports of a ``--capture nbd`` VM (None for other VMs), listening from the
        first call until the agent stops or :meth:`_withdraw` (they may serve nothing yet)."""
        if record.settings.capture != "nbd":
            return None
        exports = self.exports.get(record.name)
        if exports is None:
            exports = VmExports(
                record.name, socket_path(self.site.config, record.name), self.nbd_tcp
            )
            await exports.start()
            self.exports[record.name] = exports
        return exports

    async def _serve(self, record: VmRecord, reason: str) -> None:
        """This site holds the VM but does not capture its writes (a replica, an old primary):
        its exports serve the images read-only and refuse writes for ``reason``."""
        exports = await self._exports(record)
        if exports is not None:
            exports.serve_images({d.name: Path(d.path) for d in record.disks}, reason)

    async def _withdraw(self, vm: str) -> None:
        """Stop serving ``vm``'s exports: its worker failed and is retried, still primary here.
        A hypervisor (QEMU with ``reconnect-delay``) then waits and reconnects to the capture,
        instead of being told its writes are refused by a site that is still the primary."""
        exports = self.exports.pop(vm, None)
        if exports is not None:
            await exports.stop()

    async def _primary(self, record: VmRecord) -> None:
        if record.state in (
            ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
            ReplicationState.FAILED_OVER,
        ):
            if (
                record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER
                or await self.site.catalog.failover_point(record.name) is None
            ):
                await self._serve(
                    record,
                    (
                        f"VM {record.name!r} is being handed over by site {self.site.config.site} "
                        f"({record.state.value}); write to the new primary's exports"
                    ),
                )
            if await self._follow(record):
                return
        async with self.site.primary(record) as primary:
            # Started only now, and taken by the capture before anything else runs: a client
            # never finds the socket of an opening primary serving nothing or read-only.
            exports = await self._exports(record)
            async with CaptureFront(primary, self.site.config, self.nbd_tcp, exports) as front:
                await self._capture(record, primary, front)

    async def _capture(self, record: VmRecord, primary: PrimaryVm, front: CaptureFront) -> None:
        """The primary's work while its capture front runs: seed, then cycles."""
        self.primaries[record.name] = primary
        self.fronts[record.name] = front
        resync = self.resyncs[record.name] = ResyncWorker(self.site, primary)
        try:
            if record.state in (
                ReplicationState.READY_FOR_INITIAL_REPLICATION,
                ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
            ):
                await front.initial_replication()
            await self._cycles(primary, resync)
        finally:
            await resync.stop()
            del self.resyncs[record.name]
            del self.primaries[record.name]
            del self.fronts[record.name]

    async def _start_nbd_tcp(self) -> None:
        config = self.site.config
        if config.nbd_tcp_port is None:
            return
        server = NbdServer({}, tcp=(config.nbd_tcp_host, config.nbd_tcp_port))
        try:
            await server.start()
        except OSError as error:
            raise cannot_listen(
                "nbd_tcp_port", "nbd_tcp_host", config.nbd_tcp_port, config.nbd_tcp_host, error
            ) from None
        self.nbd_tcp = server
        log.info("serving NBD exports on %s as <vm>.<disk>", server.tcp_address)

    async def _replicate(self, primary: PrimaryVm) -> None:
        """One cycle, through the VM's capture front (scan, hooks, off-loop copies) if open."""
        front = self.fronts.get(primary.name)
        if front is not None:
            checks = primary.checks
            shipped = await front.cycle()
            if primary.checks == checks:  # a cut hook failed: the front logged it, no cycle
                self.metrics.failed(primary.name, "hook")
        else:
            shipped = await primary.replicate()
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
        while not self.stopping.is_set():
            resync.poll()
            await resync.watch()
            now = loop.time()
            due = now >= next_cut or (
                settings.frequency_seconds == 0
                and primary.capture.log.segment_bytes >= settings.continuous_max_bytes
            )
            if due:
                if await self._shipping(primary):
                    await self._replicate(primary)
                next_cut = now + period
            if now >= next_beat or primary.idle_unannounced:
                await primary.heartbeat()
                next_beat = loop.time() + self.site.config.heartbeat_seconds
            wait = max(0.05, min(next_cut, next_beat, now + RESYNC_CHECK_SECONDS) - loop.time())
            if settings.frequency_seconds == 0:
                wait = min(wait, 0.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)
        if await self._shipping(primary):
            await self._replicate(primary)  # ship what was written before the stop

    async def _shipping(self, primary: PrimaryVm) -> bool:
        """A failed-over primary captures but ships nothing until it is reversed."""
        state = (await self.site.catalog.vm(primary.name)).state
        return state not in (
            ReplicationState.FAILED_OVER,
            ReplicationState.FAILED_OVER_WAITING_COMPLETION,
        )
