"""One VM at a replica site: its images, its materialiser and the journal it reads.

:class:`ReplicaVm` resumes from the catalog's position (rolling back an interrupted cycle first),
reads committed records, applies them, and reports its position on the VM's status topic. A
journal violation stops this VM only — its state says why — and the agent carries on with the
others.

Resynchronization, the replica's part (the primary's is ``vmreplica/failover/resync.py``):

- asked by a DigestRequest in the journal, it publishes its position and a DigestMap of every
  disk on the status topic, as of the last cycle it applied, and goes on applying;
- a violation that calls for a resynchronization (a gap, a broken chain, a checksum) publishes a
  ResyncRequest saying why, then its position and digests, and from then on skips the journal
  until an epoch names this site in ``resync_sites``: that epoch's first cycle, applied like any
  other (undo log, all-or-nothing), makes the images equal to the primary's again. While it
  waits, it says so again every :data:`RESYNC_REMINDER_SECONDS` (its position, in state
  "resynchronization required"), which is how a primary's agent restarted meanwhile learns it.

About 440 lines: the replica's worker reads as one loop (connect, apply, report, wait for a
resync); the rules it applies are :mod:`~vmreplica.consumers.journal_rules` and the writing
:mod:`~vmreplica.consumers.materializer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from vmreplica.consumers.configured import replica_settings
from vmreplica.consumers.materializer import Materializer
from vmreplica.consumers.points import apply_lock
from vmreplica.consumers.retention import RetentionPolicy
from vmreplica.consumers.seeding import seed_by_compare_reason
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import VmRecord
from vmreplica.domain.names import check_name
from vmreplica.domain.settings_change import differences
from vmreplica.domain.states import Health, ReplicationState
from vmreplica.domain.statistics import SiteFacts, measure
from vmreplica.errors import (
    BrokerError,
    ConfigurationError,
    JournalTruncated,
    JournalViolation,
    ReplicationError,
    StorageFullError,
)
from vmreplica.journal.kafka import JournalReader, KafkaConnection, StatusPublisher
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import (
    CycleCommit,
    DigestMap,
    DigestRequest,
    ReplicaPosition,
    ResyncRequest,
    StatusEvent,
    VmConfig,
)
from vmreplica.security.authorization import JournalVerifier
from vmreplica.security.encryption import VmKeyRing
from vmreplica.service import Service
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.digests import digest_block_bytes, image_digests
from vmreplica.storage.history import storage_free_ratio, window_inputs
from vmreplica.storage.image import DiskImage
from vmreplica.storage.safefile import no_space

log = logging.getLogger(__name__)

FETCH_SECONDS = 0.5
"""How long one fetch waits for new records: bounds the reaction time to a stop request."""
RESYNC_REMINDER_SECONDS = 60.0
"""How often a replica waiting for a resynchronization publishes its position again."""
HEALTH_REFRESH_MS = 5_000
"""A published position carries a health measured at most this long ago (in the same state):
measuring reads the whole monitoring window, up to 3,600 cycles of a continuous VM, which is
too much to do for every cycle applied; the agent's metrics refresh as often."""


def retention_policy(record: VmRecord) -> RetentionPolicy:
    """The VM's recovery-point policy from its replication settings."""
    settings = record.settings
    if settings.continuous_points_hours:
        return RetentionPolicy(
            "every_cycle", settings.continuous_points_hours, settings.app_consistent_hours
        )
    if settings.recovery_history:
        return RetentionPolicy("hourly", settings.recovery_history, settings.app_consistent_hours)
    return RetentionPolicy("latest")


def image_path(folder: Path, disk: str) -> Path:
    """Where a replica keeps the image of ``disk``: ``<folder>/disks/<disk>.img``.

    :raises ConfigurationError: ``disk`` is not a valid disk name. Disk names come from the
        primary's VmConfig record; one like ``../../x`` or ``/var/lib/x`` must never become a
        path, and a name that passes :func:`check_name` has no dot or slash.
    """
    return folder / "disks" / f"{check_name('disk', disk)}.img"


def _open_images(record: VmRecord) -> dict[str, DiskImage]:
    """The VM's images, created sparse where missing (a returning old primary keeps its own).

    :raises ConfigurationError: an image cannot be created or opened (a size this file system
        does not allow, a full disk, no permission); none stays open.
    """
    images: dict[str, DiskImage] = {}
    for disk in record.disks:
        path = Path(disk.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            images[disk.name] = (
                DiskImage.open(path) if path.exists() else DiskImage.create(path, disk.size_bytes)
            )
        except OSError as error:
            for image in images.values():
                image.close()
            raise ConfigurationError(
                f"VM {record.name!r}: cannot create or open replica image {path} of "
                f"{disk.size_bytes} bytes ({error.strerror}). Operator action: check the disk "
                "sizes the primary sent and the space and permissions of the site's root"
            ) from error
    return images


def digest_maps(
    vm: str, epoch: int, site: str, cycle: int, disks: Sequence[tuple[str, Path, int]]
) -> list[DigestMap]:
    """A DigestMap of every disk (name, image, size) as its image holds it now, said to be as of
    ``cycle``. Reads every allocated block (holes cost nothing): run it off the event loop."""
    return [
        DigestMap(
            vm,
            epoch,
            site,
            name,
            cycle,
            digest_block_bytes(size),
            image_digests(path, digest_block_bytes(size)),
        )
        for name, path, size in disks
    ]


class ReplicaVm(Service):
    """A replicated VM at a replica site. ``async with ReplicaVm(...) as vm: await vm.run()``."""

    def __init__(
        self,
        record: VmRecord,
        site: str,
        folder: Path,
        connection: KafkaConnection,
        catalog: Catalog,
        journal_topic: str,
        status_topic: str,
        status: StatusPublisher | None = None,
        verifier: JournalVerifier | None = None,
        keys: VmKeyRing | None = None,
        heartbeat_seconds: float = 30.0,
        *,
        connect: bool = True,
        encode_status: Callable[[StatusEvent], bytes] = encode,
    ) -> None:
        """``connect=False``: :meth:`start` opens the images only (test failovers and views
        work without a broker); :meth:`connect` joins the journal later. ``encode_status``
        turns what this site reports into status records: the site's key signs them
        (:meth:`vmreplica.security.signing.SiteKey.encode`)."""
        self.encode_status = encode_status
        self.held: Callable[[], Awaitable[bool]] | None = None
        """Asked before a new cycle is applied; True holds the journal where it is (an
        operator suspended this replica), the records fetched being read again later."""
        self.holding = False
        """The last :meth:`step` held the journal where it was (``held`` said so)."""
        self.record = record
        self.heartbeat_seconds = heartbeat_seconds
        """The site's heartbeat interval: how the published health judges the primary."""
        self.site = site
        self.folder = folder
        self.catalog = catalog
        self.status_topic = status_topic
        self.status = status
        self.images = _open_images(record)
        self.materializer = Materializer(
            record.name,
            self.images,
            folder / "undo",
            catalog,
            retention_policy(record),
            self._report,
            site,
            self._digests_wanted,
            verifier,
            keys,
            self._configured,
        )
        self.reader = JournalReader(connection, journal_topic, past_retention="raise")
        self.connected = False
        """Reading the journal (and reporting on the status topic)."""
        self._connection = connection
        self._journal_topic = journal_topic
        self._connect_at_start = connect
        self.violation: JournalViolation | None = None
        self.apply_seconds = 0.0
        """Time spent applying fetched records so far (the agent's apply-time metric)."""
        self._next_reminder = 0.0
        self._health: tuple[ReplicationState, int, Health] | None = None
        """The last health measured: for which state, when (ms), what it was."""

    @property
    def name(self) -> str:
        return self.record.name

    async def start(self) -> None:
        """Recover (roll back a cycle cut short by a crash or a full disk), then read on.

        :raises StorageFullError: the roll-back itself found the file system full.
        """
        with self._space("rolling back an interrupted cycle"):
            await self.materializer.recover()
        if self._connect_at_start:
            await self.connect()

    async def connect(self) -> None:
        """Join the journal where the images stand (the last applied cycle): a cycle fetched
        in part before a disconnect is read again whole.

        :raises BrokerError: no broker answered; call again later.
        """
        if self.status is not None:
            await self.status.start()
        reader = JournalReader(self._connection, self._journal_topic, past_retention="raise")
        self.materializer.abandon_cycle()  # the images back at the last applied cycle
        await reader.start(self.materializer.cursor.next_offset)
        await self.reader.stop()
        self.reader, self.connected = reader, True
        journal_start = await reader.beginning_offset()
        reason = seed_by_compare_reason(self.record, self.materializer.cursor, journal_start)
        if reason is not None:
            await self.seed_by_compare(reason)

    async def seed_by_compare(self, reason: str) -> None:
        """Wait for a resynchronization from what the images hold (:mod:`.seeding`)."""
        violation = JournalViolation(
            self.name,
            self.materializer.cursor.next_offset,
            reason,
            ReplicationState.RESYNCHRONIZATION_REQUIRED,
        )
        self.violation = violation
        await self.catalog.set_state(self.name, violation.state, reason)
        log.warning("VM %s: %s", self.name, reason)
        await self._resync_required(violation)

    async def disconnect(self) -> None:
        """Stop reading (Kafka went away); the images stay open, :meth:`connect` resumes."""
        self.connected = False
        await self.reader.stop()

    @contextlib.contextmanager
    def _space(self, doing: str) -> Iterator[None]:
        """A full file system under ``doing`` becomes a :class:`StorageFullError`."""
        try:
            yield
        except (OSError, sqlite3.Error) as error:
            problem = no_space(error)
            if problem is None:
                raise
            raise StorageFullError(self.name, str(self.folder), doing, problem) from error

    async def stop(self) -> None:
        """Stop reading and close the images, at the last applied cycle: a cycle half applied
        (a big one, between two fetches) is rolled back first, so whatever runs next — a
        failover, an export — finds the images where the catalog says. Should that fail, the
        next :meth:`start` (or the failover) rolls it back from its undo log."""
        await self.reader.stop()
        try:
            with contextlib.suppress(OSError, ReplicationError):
                self.materializer.abandon_cycle()
        finally:
            if self.materializer.cursor.applying is not None:
                self.materializer.cursor.applying.close()
                self.materializer.cursor.applying = None
            for image in self.images.values():
                image.close()

    @property
    def between_cycles(self) -> bool:
        """The images hold exactly the last applied cycle (no cycle is being applied)."""
        return self.materializer.cursor.applying is None

    @property
    def stopped(self) -> bool:
        """A violation stopped this VM for good (operator attention). One that calls for a
        resynchronization does not: the replica goes on reading, waiting for it."""
        return self.violation is not None and (
            self.violation.state is not ReplicationState.RESYNCHRONIZATION_REQUIRED
            or not self.materializer.cursor.awaiting_resync
        )

    async def standing(
        self, state: ReplicationState | None = None
    ) -> tuple[ReplicationState, Health]:
        """This replica's state (the catalog's, unless ``state`` is about to be) and its health
        by the same rules as `vmreplica status` (:func:`~vmreplica.domain.statistics.measure`),
        measured again when the state changed or :data:`HEALTH_REFRESH_MS` passed: what every
        status record it publishes carries."""
        record = await self.catalog.vm(self.name)
        if state is not None:
            record = dataclasses.replace(record, state=state)
        now = now_ms()
        cached = self._health
        if cached is not None and cached[0] is record.state and now - cached[1] < HEALTH_REFRESH_MS:
            return record.state, cached[2]
        facts = SiteFacts(storage_free_ratio=storage_free_ratio(self.folder))
        measured = measure(
            await window_inputs(self.catalog, record, now), facts, now, self.heartbeat_seconds
        )
        self._health = (record.state, now, measured.report.health)
        return record.state, measured.report.health

    async def _report(self, commit: CycleCommit, offset: int) -> None:
        if self.status is None:
            return
        state, health = await self.standing()
        position = ReplicaPosition(
            self.name,
            commit.epoch,
            self.site,
            commit.cycle,
            offset,
            state.value,
            health.value,
            now_ms(),
            now_ms(),
        )
        try:
            await self.status.publish(
                self.status_topic, self.name.encode(), self.encode_status(position)
            )
        except BrokerError as error:
            log.warning("VM %s: could not report position: %s", self.name, error)

    async def _configured(self, config: VmConfig) -> None:
        """The primary published its settings: keep those that changed (`vmreplica set` on
        the primary), and keep recovery points by the new history from this cycle on."""
        record = await self.catalog.vm(self.name)
        settings = replica_settings(config, self.site, record.settings)
        changed = differences(record.settings, settings)
        if not changed:
            return
        said = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        await self.catalog.adopt_settings(
            self.name, settings, f"settings published by primary site {config.primary_site}: {said}"
        )
        self.record = dataclasses.replace(record, settings=settings)
        self.materializer.policy = retention_policy(self.record)
        log.info("VM %s: the primary's settings changed: %s", self.name, said)

    async def _digests_wanted(self, request: DigestRequest) -> None:
        """The primary asked for block digests (the materialiser is at a cycle boundary)."""
        log.info("VM %s: %s asks for block digests (%s)", self.name, request.site, request.reason)
        try:
            await self.publish_digests((await self.catalog.vm(self.name)).state)
        except BrokerError as error:  # the primary asks again while it waits
            log.warning("VM %s: could not publish block digests: %s", self.name, error)

    async def publish_digests(self, state: ReplicationState) -> int:
        """Publish this replica's position and a DigestMap of every disk, as of the last cycle
        it applied, on the status topic; returns that cycle.

        The position (its ``offset`` is the applied cycle's commit) tells the primary where in
        the journal the cycles after the digests start. :raises BrokerError: not published.
        """
        cursor = self.materializer.cursor
        disks = [(name, image.path, image.size) for name, image in self.images.items()]
        maps = await asyncio.to_thread(
            digest_maps, self.name, cursor.epoch, self.site, cursor.cycle, disks
        )
        if self.status is None:
            return cursor.cycle
        records: list[ReplicaPosition | DigestMap] = [await self._position(state), *maps]
        for event in records:
            await self.status.publish(
                self.status_topic, self.name.encode(), self.encode_status(event)
            )
        log.info(
            "VM %s: block digests of cycle %d published for a resynchronization",
            self.name,
            cursor.cycle,
        )
        return cursor.cycle

    async def _position(self, state: ReplicationState) -> ReplicaPosition:
        """This replica's applied position (``offset``: its cycle's commit), in ``state``."""
        cursor = self.materializer.cursor
        position = await self.catalog.position(self.name)
        _, health = await self.standing(state)
        return ReplicaPosition(
            self.name,
            cursor.epoch,
            self.site,
            cursor.cycle,
            position.next_offset - 1 if position is not None else -1,
            state.value,
            health.value,
            position.at_ms if position else 0,
            now_ms(),
        )

    async def _remind(self) -> None:
        """Waiting for a resynchronization that a violation asked for: say so again."""
        loop = asyncio.get_running_loop()
        if self.status is None or loop.time() < self._next_reminder:
            return
        self._next_reminder = loop.time() + RESYNC_REMINDER_SECONDS
        record = await self.catalog.vm(self.name)
        if (
            record.state is not ReplicationState.RESYNCHRONIZATION_REQUIRED
            or await self.catalog.failover_point(self.name) is not None
        ):
            return  # a returning old primary waits for a reverse, not a resync
        try:
            position = await self._position(ReplicationState.RESYNCHRONIZATION_REQUIRED)
            await self.status.publish(
                self.status_topic, self.name.encode(), self.encode_status(position)
            )
        except BrokerError as error:
            log.warning("VM %s: could not report position: %s", self.name, error)

    async def _resync_required(self, violation: JournalViolation) -> None:
        """Say why on the status topic, send the digests, and wait for the resynchronization.

        Reading goes back to the last applied cycle: records fetched after the violating one
        are read again, skipped until the epoch that resynchronizes this site.
        """
        self.materializer.await_resync()
        self.reader.seek(self.materializer.cursor.next_offset)
        self._next_reminder = asyncio.get_running_loop().time() + RESYNC_REMINDER_SECONDS
        if self.status is None:
            return
        request = ResyncRequest(
            self.name, self.materializer.cursor.epoch, self.site, str(violation), None, (), now_ms()
        )
        try:
            await self.status.publish(
                self.status_topic, self.name.encode(), self.encode_status(request)
            )
            await self.publish_digests(ReplicationState.RESYNCHRONIZATION_REQUIRED)
        except BrokerError as error:  # the primary's resync asks again
            log.warning("VM %s: could not ask for a resynchronization: %s", self.name, error)

    async def step(self, timeout_seconds: float = FETCH_SECONDS) -> int:
        """Fetch and apply once; return how many records were read (0 when none or stopped)."""
        if self.stopped:
            return 0
        if self.materializer.cursor.awaiting_resync:
            await self._remind()
        try:
            records = await self.reader.fetch(timeout_seconds)
        except JournalTruncated as truncated:
            await self._behind_retention(truncated)
            return 0
        if not records:
            return 0
        self.holding = self.between_cycles and self.held is not None and await self.held()
        if self.holding:
            self.reader.seek(records[0].offset)  # read again once resumed
            return 0
        started = time.monotonic()
        cycle = self.materializer.cursor.cycle + 1
        try:
            with self._space(f"applying cycle {cycle}"), apply_lock(self.folder):
                try:
                    await self.materializer.apply_records(records)
                finally:
                    self.apply_seconds += time.monotonic() - started
        except StorageFullError:
            # Give back at once the space the cut-short cycle took (its undo log), so that the
            # error can be recorded in the catalog, on the same file system; the images return
            # to the last applied cycle. Failing that, the next start does the same.
            with contextlib.suppress(OSError, sqlite3.Error, ReplicationError):
                await self.materializer.recover()
            raise
        except JournalViolation as violation:
            await self._violated(violation)
        else:
            if self.violation is not None and not self.materializer.cursor.awaiting_resync:
                self.violation = None  # the resynchronizing epoch was adopted
        return len(records)

    async def _violated(self, violation: JournalViolation) -> None:
        self.violation = violation
        await self.catalog.set_state(self.name, violation.state, str(violation))
        log.error("%s", violation)
        if (
            violation.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
            and not self.materializer.cursor.seeding
        ):  # half a seed has no digests
            await self._resync_required(violation)

    async def _behind_retention(self, truncated: JournalTruncated) -> None:
        """The next record was deleted by the journal's retention (this replica was away for
        longer): the cycles in it are lost to this replica, so only a block compare brings it
        back (:meth:`seed_by_compare`, as when it joins behind the journal's start) — its
        primary resyncs it by itself when the VM's ``auto_resync`` allows, or turns critical
        with the reason. Reading goes on from the journal's start, where the resynchronizing
        epoch will be found."""
        reason = seed_by_compare_reason(self.record, self.materializer.cursor, truncated.start)
        if reason is not None:
            await self.seed_by_compare(reason)
        self.reader.seek(truncated.start)

    async def catch_up(self, timeout_seconds: float = 30.0) -> int:
        """Apply everything committed so far; return the applied cycle.

        :raises TimeoutError: the journal's end was not reached in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        end = await self.reader.end_offset()
        # Transaction markers take offsets but are never returned as records, so progress is
        # the reader's position, not the last applied record's offset.
        while await self.reader.position() < end and not self.stopped:
            if loop.time() > deadline:
                raise TimeoutError(
                    f"VM {self.name!r}: replica did not reach journal offset "
                    f"{end} within {timeout_seconds} s"
                )
            await self.step()
        return self.materializer.cursor.cycle

    async def run(self, stopping: asyncio.Event) -> None:
        """Apply records until ``stopping`` is set or a violation stops this VM."""
        while not stopping.is_set() and not self.stopped:
            await self.step()
