"""``vmreplica agent``: one long-running process per site, primary for some VMs, replica for others.

For each VM it is primary of, the agent seeds the replica (if not yet done), cuts and ships a
cycle every replication period (continuous mode: every second, or sooner once the change log
holds ``continuous_max_bytes``), and heartbeats. For each VM it is replica of, it applies the
journal as it arrives. New VMs (enabled here, or discovered in the trust group's topics) are
picked up while it runs. One VM's failure never stops the others.

A ``--capture nbd`` VM's exports belong to the agent, not to one worker: they stay up across
every role change, capturing writes while the VM is primary here and serving the images
read-only (writes refused with EPERM) otherwise, so the new primary of a failover serves the
same export names and the old one still answers its hypervisor.
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

from vmreplica.consumers.drill import FailoverDrill
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ConfigurationError, ReplicationError, SupersededError
from vmreplica.failover import (
    carry_out,
    demote,
    follow_new_primary,
    follow_reverse,
    follow_takeover,
    promote,
    takes_over,
)
from vmreplica.failover.requests import posted_request
from vmreplica.nbd.server import NbdServer
from vmreplica.producers.capture_front import CaptureFront
from vmreplica.producers.nbd_exports import VmExports, socket_path
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.extension import ExtendedReplication, load_extension
from vmreplica.runtime.metrics import SiteMetrics
from vmreplica.runtime.site import Site
from vmreplica.runtime.status import vm_status
from vmreplica.storage.mailbox import Mailbox

log = logging.getLogger(__name__)

DISCOVERY_SECONDS: Final = 2.0
"""How often the agent looks for newly enabled or newly published VMs."""
REQUEST_POLL_SECONDS: Final = 0.25
"""How often the agent looks for failover requests and finished workers."""
METRICS_SECONDS: Final = 5.0
"""How often the Prometheus gauges are refreshed from the catalog."""
RETRY_SECONDS: Final = 30.0
"""A worker that ended on a retriable error (a broker away, a hook timed out) is retried this
long after, or as soon as its role changes."""
HELD_SECONDS: Final = 600.0
"""A worker that ended on an error someone must act on (a bad setting, a broken journal) waits
for its relationship to change, and is tried again this long after in case the cause went away."""
CONTINUOUS_TICK_SECONDS: Final = 1.0
ALIVE_STAMP_SECONDS: Final = 2.0
"""How often the agent stamps the mailbox while it carries out a long request (well inside the
mailbox's ten seconds of liveness)."""


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

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.stop)
        if self._early_signals:
            self.stop()
        log.info("agent of site %s started", self.site.config.site)
        await self._start_nbd_tcp()
        if self.site.config.metrics_port is not None:
            self.metrics.serve(self.site.config.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", self.site.config.metrics_port)
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
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            for exports in self.exports.values():
                await exports.stop()
            self.exports.clear()
            if self.nbd_tcp is not None:
                await self.nbd_tcp.stop()
            await self.mailbox.agent_gone(self.site.config.site)
            await self.mailbox.stop()
            log.info("agent of site %s stopped", self.site.config.site)

    async def _refresh_metrics(self) -> None:
        loop = asyncio.get_running_loop()
        if self.site.config.metrics_port is None or loop.time() < self._next_metrics:
            return
        self._next_metrics = loop.time() + METRICS_SECONDS
        for record in await self.site.catalog.vms():
            self.metrics.update(await vm_status(self.site, record, with_replica=False))

    async def _stop_worker(self, vm: str) -> None:
        task = self._tasks.pop(vm, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _carry_out_requests(self) -> None:
        """Failover requests the CLI left in the mailbox: each needs its VM to itself.

        A request that cannot be read (a mistake, or a kind this version does not know) fails
        without stopping the VM's worker.
        """
        for posted in await self.mailbox.pending():
            alive = asyncio.create_task(self._stay_alive())
            try:
                request = posted_request(posted)
                await self._stop_worker(request.vm)
                result = await carry_out(self.site, request)
            except ConfigurationError as error:
                await self.mailbox.finish(posted.id, "failed", str(error))
                log.error("VM %s: %s failed: %s", posted.vm, posted.kind, error)
            except ReplicationError as error:
                await self.mailbox.finish(posted.id, "refused", str(error))
                log.error("VM %s: %s refused: %s", posted.vm, posted.kind, error)
            else:
                await self.mailbox.finish(posted.id, "done", result)
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

    async def _start_new_workers(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_discovery:
            self._next_discovery = loop.time() + DISCOVERY_SECONDS
            try:
                await self.site.discover()
            except ReplicationError as error:
                log.warning("discovery failed: %s", error)
        for listed in await self.site.catalog.vms():
            generation = await self.site.catalog.generation(listed.name)
            task = self._tasks.get(listed.name)
            if task is not None and not task.done():
                continue
            ended, seen, wait = self._ended.get(listed.name, (0.0, -1, 0.0))
            if task is not None and seen == generation and loop.time() - ended < wait:
                continue  # ended on its own: retried when its role changes, or later
            # Read again, after the generation: a worker that ended since the listing (a
            # failover that just changed the role) must not be followed by one for the old role.
            record = await self.site.catalog.vm(listed.name)
            self._ended[record.name] = (loop.time() + 10**9, generation, RETRY_SECONDS)
            work = self._primary if record.role == "primary" else self._replica
            self._tasks[record.name] = asyncio.create_task(
                self._guarded(record, work), name=f"vm-{record.name}")

    async def _superseded(self, record: VmRecord, error: SupersededError) -> None:
        """A newer epoch exists: a prepared primary follows the takeover, a returning one
        stands down and reports what diverged."""
        log.warning("VM %s: %s", record.name, error)
        if record.state is ReplicationState.PREPARED_FOR_PLANNED_FAILOVER:
            await follow_takeover(self.site, record.name)
        else:
            diverged = await demote(self.site, record.name, error.start, error.offset)
            log.warning("VM %s: now a replica of %s; %d bytes diverged", record.name,
                        error.start.primary_site, diverged)

    async def _guarded(self, record: VmRecord,
                       work: Callable[[VmRecord], Awaitable[None]]) -> None:
        wait = RETRY_SECONDS
        try:
            await work(record)
        except asyncio.CancelledError:
            raise
        except SupersededError as error:
            await self._superseded(record, error)
        except ReplicationError as error:
            await self.site.catalog.set_state(record.name, ReplicationState.ERROR, str(error))
            log.error("VM %s: %s", record.name, error)
            if not error.retriable:
                wait = HELD_SECONDS
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
                while not self.stopping.is_set() and replica.violation is None:
                    cursor = replica.materializer.cursor
                    epoch, before = cursor.epoch, cursor.next_offset
                    await replica.step()
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
            log.info("VM %s: took over as primary in epoch %d", record.name, start.epoch)

    async def _follow_new_primary(self, vm: str, start_offset: int) -> None:
        """This replica applied a new epoch: if another replica site took over, follow it."""
        start = await follow_new_primary(self.site, vm, start_offset)
        if start is None:
            return
        log.info("VM %s: site %s took over in epoch %d; this replica follows it",
                 vm, start.primary_site, start.epoch)
        await self._serve_replica(await self.site.catalog.vm(vm))

    async def _prepared_and_caught_up(self, replica: ReplicaVm) -> bool:
        """The primary prepared a planned failover to this site, and nothing after it
        cancelled it (the VM's other replica sites only follow)."""
        prepared = replica.materializer.prepared
        return (prepared is not None and takes_over(prepared, self.site.config.site)
                and await replica.reader.position() >= await replica.reader.end_offset())

    async def _serve_replica(self, record: VmRecord) -> None:
        """A replica serves the images read-only; failing to (a socket path too long, taken)
        is logged, and never stops replication."""
        try:
            await self._serve(record, (
                f"VM {record.name!r} is a replica at site {self.site.config.site}; its primary "
                f"is site {record.partner_site}, whose exports take the VM's writes"))
        except (ConfigurationError, OSError) as error:
            log.warning("VM %s: not serving its replica images over NBD: %s", record.name,
                        error)

    async def _serve(self, record: VmRecord, reason: str) -> VmExports | None:
        """The NBD exports of a ``--capture nbd`` VM (None for other VMs), started on first
        use and kept up while the agent runs, serving the images read-only and refusing writes
        for ``reason`` until a capture takes them (:class:`CaptureFront`)."""
        if record.settings.capture != "nbd":
            return None
        exports = self.exports.get(record.name)
        if exports is None:
            exports = VmExports(record.name, socket_path(self.site.config, record.name),
                                self.nbd_tcp)
            await exports.start()
            self.exports[record.name] = exports
        exports.serve_images({d.name: Path(d.path) for d in record.disks}, reason)
        return exports

    async def _primary(self, record: VmRecord) -> None:
        exports = await self._serve(record, (
            f"site {self.site.config.site} does not capture VM {record.name!r}'s writes yet: "
            f"its agent is opening the VM (state {record.state.value})"))
        if record.state in (ReplicationState.PREPARED_FOR_PLANNED_FAILOVER,
                            ReplicationState.FAILED_OVER) and await self._follow(record):
            return
        async with self.site.primary(record) as primary, CaptureFront(
                primary, self.site.config, self.nbd_tcp, exports) as front:
            self.primaries[record.name] = primary
            self.fronts[record.name] = front
            try:
                if record.state in (ReplicationState.READY_FOR_INITIAL_REPLICATION,
                                    ReplicationState.INITIAL_REPLICATION_IN_PROGRESS):
                    await front.initial_replication()
                await self._cycles(primary)
            finally:
                del self.primaries[record.name]
                del self.fronts[record.name]

    async def _start_nbd_tcp(self) -> None:
        config = self.site.config
        if config.nbd_tcp_port is None:
            return
        server = NbdServer({}, tcp=(config.nbd_tcp_host, config.nbd_tcp_port))
        await server.start()
        self.nbd_tcp = server
        log.info("serving NBD exports on %s as <vm>.<disk>", server.tcp_address)

    async def _replicate(self, primary: PrimaryVm) -> None:
        """One cycle, through the VM's capture front (scan, hooks, off-loop copies) if open."""
        front = self.fronts.get(primary.name)
        if front is not None:
            await front.cycle()
        else:
            await primary.replicate()

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

    async def _cycles(self, primary: PrimaryVm) -> None:
        settings = primary.record.settings
        period = settings.frequency_seconds or CONTINUOUS_TICK_SECONDS
        loop = asyncio.get_running_loop()
        next_cut = loop.time() + period
        next_beat = loop.time()
        while not self.stopping.is_set():
            now = loop.time()
            due = now >= next_cut or (settings.frequency_seconds == 0 and
                                      primary.capture.log.segment_bytes
                                      >= settings.continuous_max_bytes)
            if due:
                if await self._shipping(primary):
                    await self._replicate(primary)
                next_cut = now + period
            if now >= next_beat:
                await primary.heartbeat()
                next_beat = now + self.site.config.heartbeat_seconds
            wait = max(0.05, min(next_cut, next_beat) - loop.time())
            if settings.frequency_seconds == 0:
                wait = min(wait, 0.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)
        if await self._shipping(primary):
            await self._replicate(primary)  # ship what was written before the stop

    async def _shipping(self, primary: PrimaryVm) -> bool:
        """A failed-over primary captures but ships nothing until it is reversed."""
        state = (await self.site.catalog.vm(primary.name)).state
        return state not in (ReplicationState.FAILED_OVER,
                             ReplicationState.FAILED_OVER_WAITING_COMPLETION)


class HopRelay:
    """Extended replication of one replica VM, if it has been extended: seed once, then relay
    every ``frequency`` seconds (see :mod:`vmreplica.runtime.extension`)."""

    def __init__(self, site: Site, vm: str) -> None:
        self.site = site
        self.vm = vm
        self.relay: ExtendedReplication | None = None
        self.next_relay = 0.0
        self.next_check = 0.0

    async def poll(self) -> None:
        loop = asyncio.get_running_loop()
        if self.relay is None:
            if loop.time() < self.next_check:
                return
            self.next_check = loop.time() + DISCOVERY_SECONDS
            extension = await load_extension(self.site, self.vm)
            if extension is None:
                return
            relay = ExtendedReplication(self.site, extension)
            await relay.__aenter__()
            self.relay = relay
            if await self.site.catalog.extension_offset(self.vm) is None:
                sent = await relay.seed()
                log.info("VM %s: extended to %s, seed sent %d bytes", self.vm,
                         extension.to_site, sent)
        if loop.time() >= self.next_relay:
            self.next_relay = loop.time() + self.relay.extension.frequency_seconds
            cycles = await self.relay.relay()
            if cycles:
                log.info("VM %s: relayed cycles %s to %s", self.vm, cycles,
                         self.relay.extension.to_site)

    async def stop(self) -> None:
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await relay.__aexit__()

