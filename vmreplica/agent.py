"""``vmreplica agent``: one long-running process per site, primary for some VMs, replica for others.

For each VM it is primary of, the agent seeds the replica (if not yet done), cuts and ships a
cycle every replication period (continuous mode: every second, or sooner once the change log
holds ``continuous_max_bytes``), and heartbeats. For each VM it is replica of, it applies the
journal as it arrives. New VMs (enabled here, or discovered in the trust group's topics) are
picked up while it runs. One VM's failure never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Final

from vmreplica.catalog import VmRecord
from vmreplica.errors import FencedError, ReplicationError
from vmreplica.producers.primary import PrimaryVm
from vmreplica.site import Site
from vmreplica.states import ReplicationState

log = logging.getLogger(__name__)

DISCOVERY_SECONDS: Final = 2.0
"""How often the agent looks for newly enabled or newly published VMs."""
CONTINUOUS_TICK_SECONDS: Final = 1.0


class Agent:
    """Runs every VM of one :class:`Site` until stopped."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.primaries: dict[str, PrimaryVm] = {}
        """Open primary VMs: a program capturing through the API writes to their ``capture``."""

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self.stop)
        log.info("agent of site %s started", self.site.config.site)
        try:
            while not self.stopping.is_set():
                await self._start_new_workers()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), DISCOVERY_SECONDS)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            log.info("agent of site %s stopped", self.site.config.site)

    async def _start_new_workers(self) -> None:
        try:
            await self.site.discover()
        except ReplicationError as error:
            log.warning("discovery failed: %s", error)
        for record in await self.site.catalog.vms():
            if record.name in self._tasks and not self._tasks[record.name].done():
                continue
            work = self._primary if record.role == "primary" else self._replica
            self._tasks[record.name] = asyncio.create_task(
                self._guarded(record, work), name=f"vm-{record.name}")

    async def _guarded(self, record: VmRecord,
                       work: Callable[[VmRecord], Awaitable[None]]) -> None:
        try:
            await work(record)
        except asyncio.CancelledError:
            raise
        except FencedError as error:
            await self.site.catalog.set_state(record.name, ReplicationState.ERROR, str(error))
            log.error("VM %s: %s", record.name, error)
        except ReplicationError as error:
            await self.site.catalog.set_state(record.name, ReplicationState.ERROR, str(error))
            log.error("VM %s: %s", record.name, error)

    async def _replica(self, record: VmRecord) -> None:
        async with await self.site.replica(record) as replica:
            await replica.run(self.stopping)

    async def _primary(self, record: VmRecord) -> None:
        async with self.site.primary(record) as primary:
            self.primaries[record.name] = primary
            if record.state in (ReplicationState.READY_FOR_INITIAL_REPLICATION,
                                ReplicationState.INITIAL_REPLICATION_IN_PROGRESS):
                await primary.initial_replication()
            try:
                await self._cycles(primary)
            finally:
                del self.primaries[record.name]

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
                await primary.replicate()
                next_cut = now + period
            if now >= next_beat:
                await primary.heartbeat()
                next_beat = now + self.site.config.heartbeat_seconds
            wait = max(0.05, min(next_cut, next_beat) - loop.time())
            if settings.frequency_seconds == 0:
                wait = min(wait, 0.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)
        await primary.replicate()  # ship what was written before the stop
