"""The materialiser: applies one VM's journal to its replica images, cycle by cycle.

Each committed cycle is applied in numbered durable steps, batch by batch as its records
arrive, in bounded memory however big the cycle (:mod:`streaming`):

1. check each record (signature: :mod:`vmreplica.security.authorization`; epoch, sequence,
   bounds, checksums: :mod:`journal_rules`), and at the commit the batch count and hash chain;
2. save the old content of every range it writes to the cycle's undo log, fsync the undo log;
3. write those ranges into the images (2 and 3 repeat every few MiB of a big cycle; a cycle
   that fails a check half-way is rolled back from its undo log at once);
4. fsync the images;
5. record position, recovery point and statistics in the catalog (one SQLite transaction);
6. prune undo logs and points that the retention policy no longer needs — looking only at the
   points the policy may drop and the undo files newer than those already removed, so the work
   follows what is pruned, not how many points are kept.

:meth:`Materializer.recover` runs at start: an undo log newer than the recorded position means a
crash between 2 and 5, and rolling it back (all of a sealed one, the durable records of one a
crash cut short) returns the images to the recorded cycle exactly. No recovery point names a
cycle before step 5, so none ever names a cycle that is half applied or failed its checks.
Reading resumes at the recorded offset, so the cycle is applied again from the journal. At any
instant the images therefore equal the primary's disks at some cycle boundary.

A full file system at any step (ENOSPC, SQLite's "disk is full") is the same case as a crash:
the error ends the VM's worker, and the next one recovers exactly as above — a partial undo log
is discarded, a sealed one rolled back — so nothing of the cycle stays applied, and the cycle
is applied again once space is freed (:class:`~vmreplica.errors.StorageFullError`).

About 490 lines: the durable order of an apply (undo log, images, fsync, position) and its
recovery after a crash or a full disk are one protocol, kept together so the order can be read
in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmreplica.consumers.journal_rules import check_batch, check_seed_chunk
from vmreplica.consumers.retention import RetentionPolicy, select_points, settled_from_ms
from vmreplica.consumers.streaming import HELD_MAX_BYTES, CycleApply
from vmreplica.consumers.undo import UndoLog
from vmreplica.consumers.views import PointView
from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Consistency, Position, RecoveryPoint
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import CorruptEventError, DecodeError, InvalidEventError, JournalViolation
from vmreplica.journal.kafka import JournalRecord
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.codec import decode_journal
from vmreplica.schemas.events import (
    CycleCommit,
    DigestRequest,
    EpochStart,
    FailoverPrepared,
    Heartbeat,
    JournalEvent,
    SeedChunk,
    VmConfig,
    WriteBatch,
)
from vmreplica.schemas.payload import PayloadUnpacker, verify
from vmreplica.security.authorization import JournalVerifier
from vmreplica.security.encryption import VmKeyRing
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage

log = logging.getLogger(__name__)

Applied = Callable[[CycleCommit, int], Awaitable[None]]
"""Called after a cycle is durably applied, with its commit and journal offset."""
Configured = Callable[[VmConfig], Awaitable[None]]
"""Called with each (verified) VmConfig of the VM's current epoch, in journal order."""
DigestsWanted = Callable[[DigestRequest], Awaitable[None]]
"""Called when the primary asks this site for block digests, at the cycle boundary where the
request stands in the journal (the images hold exactly the last applied cycle)."""


@dataclass
class ReplicaCursor:
    """Where the journal stands for this replica, and the cycle being applied."""

    epoch: int
    cycle: int
    cycle_hash: bytes
    next_offset: int
    seeding: bool
    applying: CycleApply | None = None
    """The cycle whose batches are arriving (some may be in the images already)."""
    awaiting_resync: bool = False
    """This replica diverged (a returning old primary, a journal violation): it skips the
    journal until an epoch names it in ``resync_sites``."""
    resyncing: bool = False
    canceled_epochs: set[int] = field(default_factory=set)


class Materializer:
    """Applies one VM's committed journal records to its images."""

    def __init__(
        self,
        vm: str,
        images: Mapping[str, DiskImage],
        undo_folder: Path,
        catalog: Catalog,
        policy: RetentionPolicy,
        on_applied: Applied | None = None,
        site: str = "",
        on_digests_wanted: DigestsWanted | None = None,
        verifier: JournalVerifier | None = None,
        keys: VmKeyRing | None = None,
        on_config: Configured | None = None,
    ) -> None:
        self.vm = vm
        self.on_config = on_config
        self.site = site
        self.images = dict(images)
        self.undo = UndoLog(undo_folder)
        self.catalog = catalog
        self.policy = policy
        self.on_applied = on_applied
        self.on_digests_wanted = on_digests_wanted
        self.verifier = verifier
        """Refuses records no trusted key signed (None: a tool that trusts the journal)."""
        self.views: list[PointView] = []
        """Open test-failover views; each keeps what a newer cycle overwrites."""
        self.cursor = ReplicaCursor(0, 0, GENESIS_HASH, 0, seeding=True)
        self.prepared: FailoverPrepared | None = None
        """Set when the primary prepared a planned failover and this replica holds its cycle."""
        self.keys = keys
        """The VM's payload keys at this site; learns those a verified VmConfig wraps for it."""
        self._payloads = PayloadUnpacker(keys)
        self.held_max_bytes = HELD_MAX_BYTES
        """Decoded data a cycle holds in memory before writing it (:mod:`streaming`)."""
        self._undo_discarded_through: int | None = None
        """Every undo file up to this cycle is gone (None: not known yet; the folder is listed)."""

    async def recover(self) -> ReplicaCursor:
        """Roll back a cycle whose apply a crash interrupted; return where to resume."""
        if self.cursor.applying is not None:  # the files below say what it wrote
            self.cursor.applying.close()
            self.cursor.applying = None
        position = await self.catalog.position(self.vm)
        record = await self.catalog.vm(self.vm)
        if position is not None:
            self.undo.roll_back_interrupted(self.images, position.cycle)
        seeding = record.state in (
            ReplicationState.WAITING_FOR_INITIAL_REPLICATION,
            ReplicationState.INITIAL_REPLICATION_IN_PROGRESS,
        )
        if position is None:
            self.cursor = ReplicaCursor(record.epoch, 0, GENESIS_HASH, 0, seeding=True)
        else:
            self.cursor = ReplicaCursor(
                position.epoch, position.cycle, position.cycle_hash, position.next_offset, seeding
            )
        if (
            record.state is ReplicationState.RESYNCHRONIZING
            and position is not None
            and position.epoch == record.epoch
        ):
            # A crash after the resynchronizing cycle was recorded, before its state was.
            await self._resynchronized(position.cycle)
        else:
            # A crash between adopting the resynchronizing epoch and applying its first cycle
            # leaves the old position: the epoch is found again in the journal.
            self.cursor.awaiting_resync = record.state in (
                ReplicationState.RESYNCHRONIZATION_REQUIRED,
                ReplicationState.RESYNCHRONIZING,
            )
        self.cursor.canceled_epochs = await self.catalog.canceled_epochs(self.vm)
        return self.cursor

    async def apply_records(self, records: list[JournalRecord]) -> None:
        """Process fetched records in order.

        :raises JournalViolation: a record breaks the rules; nothing of its cycle was applied
            and the cursor still points at the last good cycle.
        """
        try:
            await self._apply_records(records)
        except JournalViolation:
            self.abandon_cycle()  # nothing of a cycle that broke a rule stays applied
            raise

    async def _apply_records(self, records: list[JournalRecord]) -> None:
        seed_written = False
        for record in records:
            if record.offset < self.cursor.next_offset:
                continue
            try:
                event = decode_journal(record.value)
            except InvalidEventError as error:  # decodes, but a value is out of bounds
                raise JournalViolation(
                    self.vm, record.offset, str(error), ReplicationState.ERROR
                ) from error
            except DecodeError as error:
                raise JournalViolation(
                    self.vm, record.offset, f"undecodable record: {error}", ReplicationState.ERROR
                ) from error
            if event.vm != self.vm:
                raise JournalViolation(
                    self.vm, record.offset, f"record names VM {event.vm!r}", ReplicationState.ERROR
                )
            if event.epoch < self.cursor.epoch or event.epoch in self.cursor.canceled_epochs:
                log.warning(
                    "VM %s: ignoring a record of superseded epoch %d at offset %d",
                    self.vm,
                    event.epoch,
                    record.offset,
                )
                continue
            if self.verifier is not None:  # before any value of the record is used
                self.verifier.check(event, record.offset, record.value)
            if isinstance(event, DigestRequest):
                await self._digests_wanted(event)
                continue
            if isinstance(event, VmConfig):
                if self.keys is not None:
                    self._learn_keys(event, record.offset)
                if self.on_config is not None:  # the primary's settings, perhaps changed
                    await self.on_config(event)
                continue
            if self.cursor.awaiting_resync:
                if isinstance(event, Heartbeat):  # an unplanned failover still asks for it
                    await self.catalog.record_heartbeat(
                        self.vm, event.at_ms, None, from_primary_site=True
                    )
                await self._await_resync(event, record.offset)
                continue
            if self.prepared is not None and isinstance(event, WriteBatch | CycleCommit):
                self.prepared = None  # the primary shipped on: its planned failover was cancelled
            if isinstance(event, SeedChunk):
                seed_written |= await self._seed(event, record.offset)
            elif isinstance(event, WriteBatch):
                self._batch(event, record.offset)
            elif isinstance(event, CycleCommit):
                await self._apply_cycle(event, record)
            elif isinstance(event, EpochStart):
                await self._start_epoch(event, record.offset)
            elif isinstance(event, Heartbeat):
                await self._heartbeat(event)
            elif isinstance(event, FailoverPrepared):
                self._prepared(event, record.offset)
        if seed_written:
            await self._record_seed_progress(records[-1].offset + 1)

    def _batch(self, batch: WriteBatch, offset: int) -> None:
        """Check a batch of the next cycle and apply it (it may stay held until more come)."""
        cursor = self.cursor
        applying = cursor.applying
        so_far = 0 if applying is None else applying.batches
        check_batch(self.vm, offset, batch, cursor.epoch, cursor.cycle + 1, so_far)
        if applying is None:
            applying = cursor.applying = self._cycle_apply()
        applying.add(offset, batch, self._payloads)

    def _cycle_apply(self) -> CycleApply:
        cursor = self.cursor
        return CycleApply(
            self.vm,
            cursor.epoch,
            cursor.cycle + 1,
            cursor.cycle_hash,
            self.images,
            self.undo,
            self.views,
            self.held_max_bytes,
        )

    def abandon_cycle(self) -> None:
        """Give up the cycle whose batches were arriving (a violation, an epoch change, reading
        again from the last applied cycle): the images return to that cycle."""
        applying, self.cursor.applying = self.cursor.applying, None
        if applying is not None:
            applying.abandon()

    def _learn_keys(self, config: VmConfig, offset: int) -> None:
        """Keep the payload keys a (verified) VmConfig wraps for this site, before any payload
        encrypted with them is read."""
        assert self.keys is not None
        try:
            self.keys.learn(config, self.site)
        except CorruptEventError as error:
            raise JournalViolation(self.vm, offset, str(error), ReplicationState.ERROR) from error

    async def _heartbeat(self, event: Heartbeat) -> None:
        """The primary is alive; if it says nothing waited to ship, this replica — which holds
        every cycle before the heartbeat, in journal order — holds every write it had then."""
        cursor = self.cursor
        holds_all = (
            not cursor.seeding and cursor.applying is None and event.last_cycle == cursor.cycle
        )
        await self.catalog.record_heartbeat(
            self.vm, event.at_ms, event.idle_at_ms if holds_all else None, from_primary_site=True
        )

    def await_resync(self) -> None:
        """Stop applying until an epoch names this site in ``resync_sites`` (a journal violation
        made the images unfit to follow the journal); a cycle assembled so far is dropped."""
        self.cursor.awaiting_resync = True
        self.abandon_cycle()

    async def _digests_wanted(self, event: DigestRequest) -> None:
        """The primary asks for block digests; a seeding replica has none worth sending yet,
        unless it waits to be seeded by a block compare (:mod:`.seeding`)."""
        if (
            self.site in event.replica_sites
            and (not self.cursor.seeding or self.cursor.awaiting_resync)
            and self.cursor.applying is None
            and self.on_digests_wanted is not None
        ):
            await self.on_digests_wanted(event)

    def _prepared(self, event: FailoverPrepared, offset: int) -> None:
        """The primary shipped its final cycle: check this replica holds exactly that cycle."""
        cursor = self.cursor
        if (event.epoch, event.final_cycle, event.cycle_hash) != (
            cursor.epoch,
            cursor.cycle,
            cursor.cycle_hash,
        ):
            raise JournalViolation(
                self.vm,
                offset,
                f"planned failover prepared at cycle {event.final_cycle} of "
                f"epoch {event.epoch}, but this replica holds cycle {cursor.cycle} of epoch "
                f"{cursor.epoch} with another hash; the takeover is refused",
            )
        cursor.next_offset = offset + 1
        self.prepared = event

    async def _await_resync(self, event: JournalEvent, offset: int) -> None:
        """Skip the new primary's records until the epoch that resynchronises this site."""
        if not (isinstance(event, EpochStart) and self.site in event.resync_sites):
            return
        cursor = self.cursor
        cursor.epoch, cursor.cycle = event.epoch, event.start_cycle - 1
        cursor.cycle_hash, cursor.next_offset = event.last_cycle_hash, offset + 1
        cursor.awaiting_resync, cursor.resyncing = False, True
        cursor.seeding = False  # seeded by this epoch's first cycle, when it was not before
        await self.catalog.set_epoch(self.vm, event.epoch)
        await self.catalog.set_state(
            self.vm,
            ReplicationState.RESYNCHRONIZING,
            f"receiving the ranges that diverged, from epoch {event.epoch}",
        )

    async def _start_epoch(self, event: EpochStart, offset: int) -> None:
        cursor = self.cursor
        if cursor.seeding:
            cursor.epoch, cursor.cycle = event.epoch, event.start_cycle - 1
            cursor.cycle_hash = event.last_cycle_hash
            await self.catalog.set_epoch(self.vm, event.epoch)
            await self.catalog.set_state(self.vm, ReplicationState.INITIAL_REPLICATION_IN_PROGRESS)
            return
        if event.start_cycle != cursor.cycle + 1 or event.last_cycle_hash != cursor.cycle_hash:
            raise JournalViolation(
                self.vm,
                offset,
                f"epoch {event.epoch} starts after cycle "
                f"{event.start_cycle - 1} but this replica is at cycle {cursor.cycle}; "
                "a resynchronization is needed to follow the new primary",
            )
        cursor.epoch = event.epoch
        self.abandon_cycle()
        await self.catalog.set_epoch(self.vm, event.epoch)
        if self.site in event.resync_sites:  # the epoch's first cycle repairs this replica
            cursor.resyncing = True
            await self.catalog.set_state(
                self.vm,
                ReplicationState.RESYNCHRONIZING,
                f"receiving the blocks that differ, from epoch {event.epoch}",
            )

    async def _seed(self, chunk: SeedChunk, offset: int) -> bool:
        """Write a seed chunk straight into the image (no points exist yet, so no undo)."""
        if not self.cursor.seeding:
            raise JournalViolation(self.vm, offset, "seed chunk after initial replication ended")
        if chunk.done:
            for image in self.images.values():
                image.fsync()
            self.cursor.seeding = False
            self.cursor.next_offset = offset + 1
            await self.catalog.advance_position(
                self.vm,
                Position(
                    self.cursor.epoch,
                    self.cursor.cycle,
                    self.cursor.cycle_hash,
                    offset + 1,
                    now_ms(),
                ),
            )
            await self.catalog.set_state(self.vm, ReplicationState.REPLICATING)
            return False
        check_seed_chunk(
            self.vm, offset, chunk, {name: image.size for name, image in self.images.items()}
        )
        target = self.images[chunk.disk]
        try:
            data = self._payloads.open(chunk, chunk.length)
        except CorruptEventError as error:
            raise JournalViolation(
                self.vm, offset, f"seed chunk does not decompress: {error}", ReplicationState.ERROR
            ) from error
        if not verify(data, chunk.crc32, chunk.length):
            raise JournalViolation(
                self.vm,
                offset,
                f"seed chunk at {chunk.offset} of disk {chunk.disk!r} fails its checksum",
            )
        target.write(chunk.offset, data)
        return True

    async def _record_seed_progress(self, next_offset: int) -> None:
        if not self.cursor.seeding:
            return
        for image in self.images.values():
            image.fsync()
        self.cursor.next_offset = next_offset
        await self.catalog.advance_position(
            self.vm,
            Position(
                self.cursor.epoch, self.cursor.cycle, self.cursor.cycle_hash, next_offset, now_ms()
            ),
        )

    async def _apply_cycle(self, commit: CycleCommit, record: JournalRecord) -> None:
        """Steps 1-6 of the module docstring."""
        cursor = self.cursor
        if cursor.applying is None:  # a cycle of no batch
            cursor.applying = self._cycle_apply()
        # Step 1 for the commit (a violation abandons the cycle: see apply_records), then
        # steps 2-3 for what is still held.
        cursor.applying.finish(record.offset, commit)
        cursor.applying = None
        for image in self.images.values():  # step 4
            image.fsync()
        point = RecoveryPoint(
            commit.cycle,
            commit.epoch,
            record.offset,
            commit.cut_at_ms,
            Consistency[commit.consistency.name],
            commit.cycle_hash,
        )
        position = Position(
            commit.epoch, commit.cycle, commit.cycle_hash, record.offset + 1, now_ms()
        )
        await self.catalog.advance_position(
            self.vm,
            position,
            point=point,  # step 5
            cut_at_ms=commit.cut_at_ms,
            size_bytes=commit.payload_bytes,
            started_at_ms=commit.started_at_ms,
            consistency=point.consistency,
        )
        if cursor.resyncing:
            cursor.resyncing = False
            await self._resynchronized(commit.cycle)
        cursor.cycle, cursor.cycle_hash = commit.cycle, commit.cycle_hash
        cursor.next_offset = record.offset + 1
        await self._prune(point)  # step 6
        if self.on_applied is not None:
            await self.on_applied(commit, record.offset)

    async def _resynchronized(self, cycle: int) -> None:
        """The resynchronizing ``cycle`` is applied: the images equal the primary's again.

        Points before it hold the diverged blocks, so none of them is a state the primary was
        ever in: they go (as Hyper-V deletes them too).
        """
        await self.catalog.keep_points(self.vm, [cycle])
        await self.catalog.set_failover_point(self.vm, None)
        await self.catalog.set_state(
            self.vm, ReplicationState.REPLICATING, f"resynchronized at cycle {cycle}"
        )

    async def _prune(self, newest: RecoveryPoint) -> None:
        """Step 6: forget the points the policy no longer keeps, then the undo files that only
        they needed (rebuilding a point needs the undo of every later cycle).

        Continuous protection keeps every point of its history without looking at them: only
        points cut before it are candidates (:func:`settled_from_ms`), and the other policies
        keep a few dozen points at most.
        """
        now = now_ms()
        settled = settled_from_ms(self.policy, now)
        candidates = [
            p
            for p in await self.catalog.points(self.vm, cut_before_ms=settled)
            if p.cycle != newest.cycle
        ]
        kept = select_points([*candidates, newest], self.policy, now)
        await self.catalog.keep_points(self.vm, [p.cycle for p in kept], cut_before_ms=settled)
        oldest = await self.catalog.oldest_point(self.vm)
        through = self.cursor.cycle if oldest is None else oldest
        self.undo.discard_through(through, after=self._undo_discarded_through)
        self._undo_discarded_through = through
