"""One VM at its primary site: capture, initial replication, cycles and heartbeats.

:class:`PrimaryVm` owns the VM's :class:`CapturedVm`, its transactional publisher (whose
``transactional_id`` every site shares for the VM, so a newer primary fences this one) and its
:class:`CycleShipper`. The agent's scheduler and the Python API both drive it.

**An idle VM publishes no cycle.** :meth:`PrimaryVm.replicate` cuts a cycle only when something
waits to ship — a write, zero or trim in the change log, a sealed cycle not yet shipped, or a
degraded cycle's dirty-block map — in every mode (continuous, 30 s, 5 or 15 minutes), unless the
cut is application-consistent or forced. An idle check moves the open cycle's start forward, so
a cycle's ``started_at_ms`` is the last instant the primary knew nothing waited: the replica
tells idle time from time writes waited for a cycle that did not come (missed cycles).
Liveness comes from heartbeats instead (:meth:`PrimaryVm.heartbeat`), each saying whether
anything waited (``Heartbeat.idle_at_ms``); the rules that turn that into an RPO and health are
in :mod:`vmreplica.domain.states`.

About 500 lines: the primary's facade over capture, shipper and seeder — start, connect,
replicate, heartbeat, epochs — one object every caller (agent, failover, tests) goes through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.intervals import IntervalSet
from vmreplica.domain.model import VmRecord
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import BrokerError, FencedError, SupersededError, UntrustedRecordError
from vmreplica.journal.kafka import STALL_SECONDS, JournalPublisher, KafkaConnection, read_to_end
from vmreplica.journal.pace import pace_for
from vmreplica.producers.capture import CapturedVm
from vmreplica.producers.changelog import HEADER_BYTES, SEGMENT_SUFFIX, read_segment
from vmreplica.producers.seed import InitialReplication, Progress, SeedResult, disk_sizes
from vmreplica.producers.shipper import CycleBuilder, CycleShipper, ShippedCycle
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import (
    DiskDigest,
    EpochStart,
    Heartbeat,
    JournalEvent,
    VmConfig,
    WrappedKey,
)
from vmreplica.schemas.payload import PayloadCipher
from vmreplica.security.authorization import JournalVerifier
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import sha256_of

RESEND_RECORD_BYTES: Final = 4 * 1024 * 1024
"""Content resent by :meth:`PrimaryVm.append_current_content` goes into change-log records of at
most this size, the size of one write batch's payload."""
REOPENED_SEGMENT_PARSE_BYTES: Final = 64 * 1024
"""An open segment reopened at start and no larger than this is read to see whether it holds
only clean-close markers (nothing waits); a larger one surely holds writes."""

RangesToResend = Callable[[], Awaitable[Mapping[str, IntervalSet]]]
"""Asked, with no cycle being cut meanwhile, which byte ranges of which disks to resend."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resent:
    """What :meth:`PrimaryVm.resend_in_new_epoch` did."""

    start: EpochStart
    shipped: list[ShippedCycle]
    """Every cycle shipped meanwhile; the last is the epoch's first, holding the content."""
    resent_bytes: int
    """Bytes of current content appended to that cycle."""


class PrimaryVm:
    """A replicated VM at its primary site. ``async with PrimaryVm(...) as vm: ...``."""

    def __init__(
        self,
        record: VmRecord,
        site: str,
        folder: Path,
        connection: KafkaConnection,
        catalog: Catalog,
        journal_topic: str,
        transactional_id: str,
        encode: Callable[[JournalEvent], bytes] = encode,
        cipher: PayloadCipher | None = None,
        wrapped_keys: tuple[WrappedKey, ...] = (),
        announce_keys: bool = False,
        verifier: JournalVerifier | None = None,
        *,
        connect: bool = True,
        configs_topic: str | None = None,
        ensure_configs_topic: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``connect=False``: :meth:`start` opens the capture only and publishes nothing, for
        a primary whose epoch is not yet in the journal (a failover with no broker
        reachable); :meth:`connect` joins the journal later. ``configs_topic``: the trust
        group's compacted topic where :meth:`publish_config` keeps the VM's settings, created
        by ``ensure_configs_topic`` if need be."""
        self.record = record
        self.connected = False
        """The journal is joined: this primary may publish (its epoch is in the journal)."""
        self._connect_at_start = connect
        self.site = site
        self.catalog = catalog
        self.connection = connection
        self.topic = journal_topic
        self.configs_topic = configs_topic
        self._ensure_configs_topic = ensure_configs_topic
        self.capture = CapturedVm(
            record.name,
            [(d.name, Path(d.path), d.size_bytes) for d in record.disks],
            folder / "changelog",
            budget_bytes=record.settings.changelog_budget_bytes,
            # A scan's records are copies of the image the guest may since have overwritten.
            redo=record.settings.capture != "scan",
        )
        self.publisher = JournalPublisher(
            connection,
            transactional_id,
            encode,
            cipher,
            pace_for(record.settings.bandwidth_bytes_per_second),
        )
        self.wrapped_keys = wrapped_keys
        """The VM's payload keys wrapped for its replica sites, published in its VmConfig."""
        self.verifier = verifier
        """Checks the signature of an epoch another site claims, before this one yields to it."""
        self._announce_keys = announce_keys
        """A new payload key was made: a VmConfig carries it before the first payload uses it."""
        self.shipper = CycleShipper(
            record.name,
            journal_topic,
            self.capture.log,
            self.publisher,
            catalog,
            CycleBuilder(
                record.name,
                record.epoch,
                disk_sizes(self.capture),
                record.settings.compression,
                encode,
                cipher,
            ),
        )
        self._lock = asyncio.Lock()
        self.checks = 0
        """How many times :meth:`replicate` looked at the change log (and cut, or found it
        idle): a scheduler tells a skipped cycle (a failed hook) from an idle one by it."""
        self._checked_ms: int | None = None
        """When :meth:`replicate` last found nothing waiting, or cut everything that did."""
        self._said_idle = False
        """The last word the replica heard was a heartbeat saying nothing waited."""
        self._empty_segment = self._reopened_empty_segment()
        """(cycle, size) of the open segment while it holds no change: a segment reopened
        after a clean stop carries a close marker and is not empty for all that."""

    @property
    def name(self) -> str:
        return self.record.name

    def _reopened_empty_segment(self) -> tuple[int, int]:
        log = self.capture.log
        if HEADER_BYTES < log.segment_bytes <= REOPENED_SEGMENT_PARSE_BYTES:
            path = log.folder / f"{log.cycle:020d}{SEGMENT_SUFFIX}"
            if path.exists() and not read_segment(path, repair=False).records:
                return log.cycle, log.segment_bytes
        return log.cycle, HEADER_BYTES

    def changes_waiting(self) -> bool:
        """Something waits to ship: a change in the open cycle, a sealed cycle not yet shipped
        (a ship failed), or the dirty-block map of a cycle over its budget."""
        capture, log = self.capture, self.capture.log
        cycle, empty = self._empty_segment
        if log.cycle != cycle:
            self._empty_segment = (log.cycle, HEADER_BYTES)
            empty = HEADER_BYTES
        return (
            log.segment_bytes > empty
            or capture.dirty is not None
            or sum(1 for _ in log.folder.glob(f"*{SEGMENT_SUFFIX}")) > 1
        )

    def idle_at_ms(self) -> int | None:
        """An instant at which nothing waited to ship (every write is in a shipped cycle), or
        None while something waits. Now, for captures that see every write as it happens; for
        a scanned VM, its last scan (what the image did since, the next scan tells)."""
        if self.changes_waiting():
            return None
        if self.record.settings.capture == "scan":
            return self._checked_ms
        return now_ms()

    @property
    def idle_unannounced(self) -> bool:
        """Nothing waits to ship, but the replica last heard otherwise (a cycle, or a heartbeat
        saying writes waited): a heartbeat now tells it that it holds every write."""
        return not self._said_idle and self.idle_at_ms() is not None

    async def start(self) -> None:
        """Open the VM: :meth:`connect`, unless it was made with ``connect=False`` (then the
        capture alone runs, and nothing is published until :meth:`connect`)."""
        if self._connect_at_start:
            await self.connect()
            return
        position = await self.catalog.position(self.name)
        if position is not None:  # the writes captured meanwhile belong to the next cycle
            self._number_open_cycle(position.cycle + 1)

    def _number_open_cycle(self, cycle: int) -> None:
        log = self.capture.log
        if not any(True for _ in log.sealed_segments()) and log.cycle != cycle:
            log.renumber_open_segment(cycle)

    async def connect(self) -> None:
        """Check no newer primary exists, initialise the publisher (fencing any older producer
        of this VM), reconcile shipped cycles and number the open cycle.

        :raises SupersededError: the journal has a newer epoch: another site is primary now.
            Nothing was published; initialising our producer would have fenced the new primary.
        """
        await self._connect(self.publisher.start)

    async def reconnect(self) -> None:
        """After a publish failed on Kafka's side (the brokers, or the link to them, away):
        check again that no newer primary exists, restart the publisher — the broker then
        settles the transaction the failed publish left open — and reconcile with the journal,
        so a cycle that committed although its publish failed is adopted, not sent twice.

        :raises BrokerError: Kafka still does not answer (within twice
            :data:`~vmreplica.journal.kafka.STALL_SECONDS`).
        :raises SupersededError: another site started a newer epoch meanwhile.
        """
        async with self._lock:
            try:
                async with asyncio.timeout(2 * STALL_SECONDS):
                    await self._connect(self.publisher.restart)
            except TimeoutError:
                raise BrokerError(
                    f"VM {self.name!r}: reading its journal back: Kafka did not answer within "
                    f"{2 * STALL_SECONDS:.0f} s"
                ) from None

    async def _connect(self, open_publisher: Callable[[], Awaitable[None]]) -> None:
        position = await self.catalog.position(self.name)
        if position is not None:
            newer = await self._newer_epoch(position.next_offset)
            if newer is not None and newer[0].primary_site == self.site:
                # This site published it (a resync, a reverse) and stopped before recording it.
                await self._adopt_epoch(newer[0].epoch)
            elif newer is not None:
                self.capture.fenced_reason = f"site {newer[0].primary_site} is primary now"
                raise SupersededError(self.name, *newer)
        await open_publisher()
        if position is not None and self._announce_keys:  # before any payload under the key
            await self.publish(self.config_event())
            self._announce_keys = False
        if position is not None:  # settings or keys may have changed while it was stopped
            await self.publish_config()
        if position is not None:
            position = await self.shipper.reconcile(self.connection)
            self._number_open_cycle(position.cycle + 1)
        self.connected = True

    async def _newer_epoch(self, start: int) -> tuple[EpochStart, int] | None:
        found = None
        # Past the journal's end: this site's position is another cluster's (it was pointed at
        # this one after a failover elsewhere), so every epoch here counts.
        records = read_to_end(self.connection, self.topic, start, past_end_reads_all=True)
        async for record in records:
            event = decode_journal(record.value)
            if isinstance(event, EpochStart) and event.epoch > self.record.epoch:
                if self.verifier is not None:
                    try:
                        self.verifier.check(event, record.offset, record.value)
                    except UntrustedRecordError as error:
                        log.warning("%s; ignoring that epoch", error)  # a forger's, not a site's
                        continue
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
        return VmConfig(
            self.name,
            self.record.epoch,
            disk_sizes(self.capture),
            settings.frequency_seconds,
            settings.recovery_history,
            settings.app_consistent_hours,
            self.site,
            now_ms(),
            (self.record.partner_site, *settings.also_replicate_to),
            settings.continuous_points_hours,
            settings.capture,
            settings.compression,
            settings.continuous_max_bytes,
            settings.changelog_budget_bytes,
            self.wrapped_keys,
            initial=settings.initial,
        )

    async def publish_config(self) -> None:
        """Keep the VM's settings (VmConfig, signed like every record) on the trust group's
        compacted configs topic, keyed by VM: what a replica site added at any time discovers
        the VM by (:meth:`~vmreplica.runtime.site.Site.discover`), long after the journal's
        retention deleted the seed. Published at the seed, at every start and every epoch."""
        if self.configs_topic is not None:
            if self._ensure_configs_topic is not None:
                await self._ensure_configs_topic()
            await self.publisher.publish(
                self.configs_topic, self.name.encode(), [self.publisher.encode(self.config_event())]
            )

    async def initial_replication(self, progress: Progress | None = None) -> SeedResult:
        """Seed the replica (resuming an interrupted seed), then ship what queued meanwhile.

        A VM enabled with ``--initial-at`` waits until then (its writes are captured and ship
        after the seed); the seed's mode is the VM's ``initial`` setting
        (:mod:`~vmreplica.producers.seed`).
        """
        due = self.record.settings.initial_at_ms
        if due is not None and due > now_ms():
            when = datetime.fromtimestamp(due / 1000).astimezone().isoformat(timespec="minutes")
            await self.catalog.set_state(
                self.name,
                ReplicationState.READY_FOR_INITIAL_REPLICATION,
                f"initial replication ({self.record.settings.initial}) scheduled at {when}",
            )
            await asyncio.sleep((due - now_ms()) / 1000)
        async with self._lock:
            await self.catalog.set_state(
                self.name, ReplicationState.INITIAL_REPLICATION_IN_PROGRESS
            )
            seed = InitialReplication(
                self.capture,
                self.publisher,
                self.topic,
                self.catalog,
                self.config_event(),
                self.site,
            )
            result = await seed.run(progress)
            await self.publish_config()  # after: the seed's first step comes first
            await self.catalog.record_initial_replication(self.name, result.bytes_sent)
            await self.catalog.set_state(self.name, ReplicationState.REPLICATING)
            return result

    async def replicate(
        self,
        application_consistent: bool = False,
        *,
        force: bool = False,
        after_cut: Callable[[], Awaitable[None]] | None = None,
    ) -> list[ShippedCycle]:
        """Cut a cycle now and ship every sealed cycle; what the scheduler calls each period.

        Nothing is cut, and nothing published, when nothing waits to ship
        (:meth:`changes_waiting`): an idle VM costs no journal record, undo file or recovery
        point. An application-consistent cut is always made (the point is wanted), and
        ``force`` makes an empty cycle on purpose (cancelling a planned failover: a replica
        that sees a cycle after the prepare stays a replica). ``after_cut`` runs right after
        the cut, before the cycle ships (thawing a guest frozen for the cut).
        """
        async with self._lock:
            self.checks += 1
            if not (force or application_consistent or self.changes_waiting()):
                self._checked_ms = self.capture.cycle_started_ms = now_ms()
                return []
            # Most of the cut's fsync work, in a worker thread while writes go on: the cut
            # itself (on the event loop) then fsyncs only what was written since.
            await self.capture.flush()
            self.capture.cut(application_consistent)
            self._said_idle = False
            if after_cut is not None:
                await after_cut()
            try:
                shipped = await self.shipper.ship_sealed()
            except FencedError:
                self.capture.fenced_reason = (
                    f"VM {self.name!r} has a newer primary; this site no longer accepts writes "
                    "for it. Operator action: `vmreplica reverse` on the new primary."
                )
                raise
            self._checked_ms = self.capture.cycle_started_ms
            return shipped

    async def heartbeat(self) -> None:
        """Tell the replica this primary is alive, and whether anything waits to ship.

        Also recorded in this site's catalog, where `vmreplica status` and the metrics read the
        primary's own RPO by the same rules as the replica's.
        """
        async with self._lock:
            position = await self.catalog.position(self.name)
            last = position.cycle if position is not None else -1
            idle_at = self.idle_at_ms() if position is not None else None
            beat = Heartbeat(self.name, self.record.epoch, self.site, now_ms(), last, idle_at)
            await self.publish(beat)
            await self.catalog.record_heartbeat(self.name, beat.at_ms, idle_at)
            self._said_idle = idle_at is not None

    async def publish(self, event: JournalEvent) -> None:
        """Publish one event to the VM's journal outside any cycle (as its own transaction);
        a control record, which the VM's bandwidth limit never holds back."""
        await self.publisher.publish(
            self.topic, self.name.encode(), [self.publisher.encode(event)], paced=False
        )

    # What failover asks of a primary (vmreplica/failover) --------------------------------------

    def refuse_writes(self, reason: str) -> None:
        """Fence the capture: from now on every write fails, saying ``reason``."""
        self.capture.fenced_reason = reason

    async def start_epoch(self, start: EpochStart) -> None:
        """Publish ``start`` and number every later cycle in its epoch (catalog included);
        the VM's configuration follows on the configs topic, naming this site primary."""
        await self.publish(start)
        await self._adopt_epoch(start.epoch)
        await self.publish_config()

    async def _adopt_epoch(self, epoch: int) -> None:
        await self.catalog.set_epoch(self.name, epoch)
        self.shipper.builder.epoch = epoch
        self.record = replace(self.record, epoch=epoch)

    async def resend_in_new_epoch(
        self, resync_sites: Sequence[str], reason: str, ranges: RangesToResend
    ) -> Resent:
        """Ship the current content of some ranges as the first cycle of a new epoch that
        names ``resync_sites``: how a replica is resynchronized (and a reverse sent).

        The VM goes on writing meanwhile. Steps, with no other cycle cut or shipped between
        them (the cycle lock is held):

        1. ship the cycles already sealed, so the new epoch's first cycle is the open one;
        2. ask ``ranges`` what to resend (it may read the journal, which now holds step 1);
        3. append those ranges' current content to the open cycle, durably;
        4. publish the EpochStart, naming ``resync_sites``, for the open cycle;
        5. cut and ship it.

        A crash before 3 completes leaves at most some content in the change log, shipped as
        an ordinary cycle later; after 3, the content is in the cycle that step 5 ships, or
        (a crash between 4 and 5) that the next start ships, having adopted the epoch.

        :raises FencedError: a newer primary exists; this site no longer accepts writes.
        """
        async with self._lock:
            try:
                shipped = await self.shipper.ship_sealed()  # step 1
                wanted = await ranges()  # step 2
                resent = await self.append_current_content(wanted)  # step 3
                position = await self.shipper.position()
                start = EpochStart(
                    self.name,
                    self.record.epoch + 1,
                    self.record.epoch,
                    self.site,
                    position.cycle + 1,
                    reason,
                    now_ms(),
                    position.cycle_hash,
                    tuple(resync_sites),
                )
                await self.start_epoch(start)  # step 4
                self.capture.cut()  # step 5
                self._said_idle = False
                shipped += await self.shipper.ship_sealed()
                self._checked_ms = self.capture.cycle_started_ms
            except FencedError:
                self.capture.fenced_reason = (
                    f"VM {self.name!r} has a newer primary; this site no longer accepts writes "
                    "for it. Operator action: `vmreplica reverse` on the new primary."
                )
                raise
        return Resent(start, shipped, resent)

    def disk_digests(self) -> tuple[DiskDigest, ...]:
        """The SHA-256 of every disk's whole content, holes read as zeros."""
        return tuple(
            DiskDigest(name, sha256_of(image))
            for name, image in zip(self.capture.disk_names, self.capture.images, strict=True)
        )

    def allocated_ranges(self) -> dict[str, IntervalSet]:
        """Every range of every disk that holds data (the rest are holes)."""
        ranges: dict[str, IntervalSet] = {}
        for name, image in zip(self.capture.disk_names, self.capture.images, strict=True):
            allocated = ranges.setdefault(name, IntervalSet())
            for offset, length in image.allocated_extents():
                allocated.add(offset, offset + length)
        return ranges

    async def append_current_content(self, ranges: Mapping[str, IntervalSet]) -> int:
        """Append what the images hold now in ``ranges`` to the open cycle, durably.

        The next cut ships those bytes as if the VM had just written them. The VM may write
        meanwhile: each chunk is read and appended in one step that no write of the VM (on the
        event loop) or of a capture thread (holding the log lock) comes between, so the log
        orders it exactly among the VM's writes, and the replica ends with what the VM wrote
        last. Between chunks the VM's I/O goes on. A hole is appended as one ZERO record,
        never read, so a range over unallocated space (a full copy of a sparse disk) costs
        next to nothing. Returns the bytes of data appended.
        """
        capture = self.capture
        appended = 0
        for disk, disk_ranges in ranges.items():
            index = capture.disk(disk)
            image = capture.images[index]
            for low, end in zip(disk_ranges.starts, disk_ranges.ends, strict=True):
                high = min(end, image.size)
                position = low
                while position < high:
                    with capture.log_lock:  # the image as it is, logged in one step
                        start, length = next(
                            iter(image.allocated_extents(position, high - position)), (high, 0)
                        )
                        if start > position:  # a hole: zeros, never read
                            capture.log.zero(index, position, start - position)
                            position = start
                        else:
                            stop = min(start + length, position + RESEND_RECORD_BYTES)
                            data = image.read(position, stop - position)
                            capture.log.write(index, position, data)
                            appended += len(data)
                            position = stop
                    await asyncio.sleep(0)
        capture.mark_unsynced()
        await capture.flush()
        return appended
