"""One VM at its primary site: capture, initial replication, cycles and heartbeats.

:class:`PrimaryVm` owns the VM's :class:`CapturedVm`, its transactional publisher (whose
``transactional_id`` every site shares for the VM, so a newer primary fences this one) and its
:class:`CycleShipper`. The agent's scheduler and the Python API both drive it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import FencedError, SupersededError
from vmreplica.journal.kafka import JournalPublisher, KafkaConnection, read_to_end
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.seed import InitialReplication, Progress, SeedResult, disk_sizes
from vmreplica.producers.shipper import CycleBuilder, CycleShipper, ShippedCycle
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import DiskDigest, EpochStart, Heartbeat, JournalEvent, VmConfig
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import sha256_of

RESEND_RECORD_BYTES: Final = 4 * 1024 * 1024
"""Content resent by :meth:`PrimaryVm.log_current_content` goes into change-log records of at
most this size, the size of one write batch's payload."""


class PrimaryVm:
    """A replicated VM at its primary site. ``async with PrimaryVm(...) as vm: ...``."""

    def __init__(self, record: VmRecord, site: str, folder: Path, connection: KafkaConnection,
                 catalog: Catalog, journal_topic: str, transactional_id: str) -> None:
        self.record = record
        self.site = site
        self.catalog = catalog
        self.connection = connection
        self.topic = journal_topic
        self.capture = CapturedVm(
            record.name, [(d.name, Path(d.path), d.size_bytes) for d in record.disks],
            folder / "changelog", budget_bytes=record.settings.changelog_budget_bytes,
            # A scan's records are copies of the image the guest may since have overwritten.
            redo=record.settings.capture != "scan")
        self.publisher = JournalPublisher(connection, transactional_id)
        self.shipper = CycleShipper(
            record.name, journal_topic, self.capture.log, self.publisher, catalog,
            CycleBuilder(record.name, record.epoch, disk_sizes(self.capture),
                         record.settings.compression))
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.record.name

    async def start(self) -> None:
        """Check no newer primary exists, initialise the publisher (fencing any older producer
        of this VM), reconcile shipped cycles and number the open cycle.

        :raises SupersededError: the journal has a newer epoch: another site is primary now.
            Nothing was published; initialising our producer would have fenced the new primary.
        """
        position = await self.catalog.position(self.name)
        if position is not None:
            newer = await self._newer_epoch(position.next_offset)
            if newer is not None:
                self.capture.fenced_reason = f"site {newer[0].primary_site} is primary now"
                raise SupersededError(self.name, *newer)
        await self.publisher.start()
        if position is not None:
            position = await self.shipper.reconcile(self.connection)
            log = self.capture.log
            if not any(True for _ in log.sealed_segments()) and log.cycle != position.cycle + 1:
                log.renumber_open_segment(position.cycle + 1)

    async def _newer_epoch(self, start: int) -> tuple[EpochStart, int] | None:
        found = None
        async for record in read_to_end(self.connection, self.topic, start):
            event = decode_journal(record.value)
            if isinstance(event, EpochStart) and event.epoch > self.record.epoch:
                found = (event, record.offset)
        return found

    async def stop(self) -> None:
        await self.publisher.stop()
        self.capture.close()

    async def __aenter__(self) -> PrimaryVm:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def config_event(self) -> VmConfig:
        settings = self.record.settings
        return VmConfig(self.name, self.record.epoch, disk_sizes(self.capture),
                        settings.frequency_seconds, settings.recovery_history,
                        settings.app_consistent_hours, self.site, now_ms(),
                        (self.record.partner_site, *settings.also_replicate_to),
                        settings.continuous_points_hours, settings.capture,
                        settings.compression, settings.continuous_max_bytes,
                        settings.changelog_budget_bytes, settings.pre_cut_hook,
                        settings.post_cut_hook)

    async def initial_replication(self, progress: Progress | None = None) -> SeedResult:
        """Seed the replica (resuming an interrupted seed), then ship what queued meanwhile."""
        async with self._lock:
            await self.catalog.set_state(self.name,
                                         ReplicationState.INITIAL_REPLICATION_IN_PROGRESS)
            seed = InitialReplication(self.capture, self.publisher, self.topic, self.catalog,
                                      self.config_event(), self.site)
            result = await seed.run(progress)
            await self.catalog.set_state(self.name, ReplicationState.REPLICATING)
            return result

    async def replicate(self, application_consistent: bool = False) -> list[ShippedCycle]:
        """Cut a cycle now and ship every sealed cycle; what the scheduler calls each period."""
        async with self._lock:
            self.capture.cut(application_consistent)
            try:
                return await self.shipper.ship_sealed()
            except FencedError:
                self.capture.fenced_reason = (
                    f"VM {self.name!r} has a newer primary; this site no longer accepts writes "
                    "for it. Operator action: `vmreplica reverse` on the new primary.")
                raise

    async def heartbeat(self) -> None:
        position = await self.catalog.position(self.name)
        last = position.cycle if position is not None else -1
        await self.publish(Heartbeat(self.name, self.record.epoch, self.site, now_ms(), last))

    async def publish(self, event: JournalEvent) -> None:
        """Publish one event to the VM's journal outside any cycle (as its own transaction)."""
        await self.publisher.publish(self.topic, self.name.encode(), [encode(event)])

    # What failover asks of a primary (vmreplica/failover) --------------------------------------

    def refuse_writes(self, reason: str) -> None:
        """Fence the capture: from now on every write fails, saying ``reason``."""
        self.capture.fenced_reason = reason

    async def start_epoch(self, start: EpochStart) -> None:
        """Publish ``start`` and number every later cycle in its epoch (catalog included)."""
        await self.publish(start)
        await self.catalog.set_epoch(self.name, start.epoch)
        self.shipper.builder.epoch = start.epoch
        self.record = replace(self.record, epoch=start.epoch)

    def disk_digests(self) -> tuple[DiskDigest, ...]:
        """The SHA-256 of every disk's whole content, holes read as zeros."""
        return tuple(DiskDigest(name, sha256_of(image))
                     for name, image in zip(self.capture.disk_names, self.capture.images,
                                            strict=True))

    def allocated_ranges(self) -> dict[str, IntervalSet]:
        """Every range of every disk that holds data (the rest are holes)."""
        ranges: dict[str, IntervalSet] = {}
        for name, image in zip(self.capture.disk_names, self.capture.images, strict=True):
            allocated = ranges.setdefault(name, IntervalSet())
            for offset, length in image.allocated_extents():
                allocated.add(offset, offset + length)
        return ranges

    def log_current_content(self, ranges: Mapping[str, IntervalSet]) -> int:
        """Append what the images hold now in ``ranges`` to the open cycle, durably.

        The next cut ships those bytes as if the VM had just written them: how reverse
        replication resends what diverged. Holes are logged as ZERO records, never read, so a
        range over unallocated space (a full copy of a sparse disk) costs next to nothing.
        Returns the bytes of data appended.
        """
        capture = self.capture
        appended = 0
        for disk, disk_ranges in ranges.items():
            index = capture.disk(disk)
            image = capture.images[index]
            for low, end in zip(disk_ranges.starts, disk_ranges.ends, strict=True):
                high = min(end, image.size)
                if low >= high:
                    continue
                position = low
                for start, length in [*image.allocated_extents(low, high - low), (high, 0)]:
                    if start > position:
                        capture.log.zero(index, position, start - position)
                    for chunk in range(start, start + length, RESEND_RECORD_BYTES):
                        stop = min(start + length, chunk + RESEND_RECORD_BYTES)
                        capture.log.write(index, chunk, image.read(chunk, stop - chunk))
                        appended += stop - chunk
                    position = max(position, start + length)
        capture.flush_sync()
        return appended
