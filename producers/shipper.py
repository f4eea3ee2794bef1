"""The cycle shipper: turns a sealed change-log segment into one Kafka transaction.

For each sealed cycle, in order:

1. coalesce the segment's writes (only the last content of each byte is sent) and turn all-zero
   writes into ZERO extents;
2. pack many extents per WriteBatch record, payloads compressed with zstd (a payload whose
   samples do not compress, such as encrypted or media data, is sent raw without compressing it
   whole: :mod:`vmreplica.schemas.payload`), records kept below the broker's size limit;
3. publish the batches and their CycleCommit (hash-chained to the previous cycle) as one
   transaction;
4. record the shipped position in the catalog;
5. delete the segment.

A crash between 3 and 4 is repaired by :meth:`CycleShipper.reconcile`, which reads the journal past
the recorded position: the transaction either committed (the cycle is adopted, not re-sent) or
never became visible (it is sent again). No cycle is ever duplicated or skipped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Consistency as DomainConsistency
from vmreplica.domain.model import Position
from vmreplica.errors import ChangeLogCorrupt, JournalIntegrityError
from vmreplica.journal.kafka import JournalPublisher, KafkaConnection, read_to_end
from vmreplica.producers.changelog import ChangeLog, LogRecord, RecordKind, Segment
from vmreplica.producers.coalesce import Change, Piece, coalesce, merge_adjacent
from vmreplica.schemas.chain import cycle_hash
from vmreplica.schemas.codec import decode_journal, encode
from vmreplica.schemas.events import (
    Consistency,
    CycleCommit,
    DiskSize,
    Extent,
    ExtentKind,
    JournalEvent,
    WriteBatch,
)
from vmreplica.schemas.payload import (
    PayloadCipher,
    PayloadPacker,
    batch_associated_data,
    checksum,
)
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import is_zero

BATCH_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
"""Uncompressed payload per WriteBatch: well under the 8 MiB record limit even if incompressible."""
BATCH_MAX_EXTENTS: Final = 8192
"""Bounds a record's metadata when a cycle is thousands of tiny scattered writes."""

_KIND: Final = {
    RecordKind.WRITE: ExtentKind.DATA,
    RecordKind.ZERO: ExtentKind.ZERO,
    RecordKind.TRIM: ExtentKind.TRIM,
}


@dataclass(frozen=True)
class ShippedCycle:
    """What one shipped cycle cost: for statistics and the benchmark's wire ratio."""

    cycle: int
    extents: int
    bytes_written: int
    payload_bytes: int
    wire_bytes: int
    commit_offset: int


@dataclass
class CycleTally:
    """Filled while a cycle's records are generated: its commit and its size on the wire."""

    wire_bytes: int = 0
    commit: CycleCommit | None = None
    extents: list[Extent] = field(default_factory=list)


def _pieces(segment: Segment) -> list[Piece[LogRecord]]:
    changes = [Change(r.disk, r.offset, r.length, _KIND[r.kind], r) for r in segment.records]
    return coalesce(changes)


def _checked(
    fd: int, segment: Segment, record: LogRecord, start: int, data: bytes, checked: set[int]
) -> int | None:
    """Compare a record's data with its CRC when the segment was parsed without reading it;
    ``data`` is the part read at ``start``. Returns the CRC of ``data`` when that was the
    whole record (the extent's checksum, computed once), else None.

    A part of a record (a write partly overwritten later in the cycle, or split between two
    batches) has the whole record read once more and checked, once per record (``checked``
    holds the data positions of the records checked so far): rare, and never skipped.

    :raises ChangeLogCorrupt: the data differs from what was logged.
    """
    expected = record.data_crc
    if expected is None or record.data_position in checked:
        return None
    checked.add(record.data_position)
    whole = start == 0 and len(data) == record.length
    crc = checksum(data if whole else os.pread(fd, record.length, record.data_position))
    if crc != expected:
        raise ChangeLogCorrupt(
            f"change-log segment {segment.path}: the data of the write of {record.length} "
            f"bytes at offset {record.offset} of disk {record.disk} differs from what was "
            "logged (its CRC does not match). Operator action: seed the VM's replica again "
            "(a full initial replication)."
        )
    return crc if whole else None


class CycleBuilder:
    """Builds the records of one cycle from a sealed segment (pure apart from reading it)."""

    def __init__(
        self,
        vm: str,
        epoch: int,
        disks: Sequence[DiskSize],
        compress: bool,
        encode: Callable[[JournalEvent], bytes] = encode,
        cipher: PayloadCipher | None = None,
    ) -> None:
        self.vm = vm
        self.encode = encode
        """Encodes (and, at a site, signs) each record."""
        self.epoch = epoch
        self.disks = tuple(disks)
        self._packer = PayloadPacker(compress, cipher)

    def extents_and_payloads(self, segment: Segment) -> Iterator[tuple[list[Extent], bytes]]:
        """Groups of extents with their uncompressed payload, each group one WriteBatch.

        Each WRITE's data is checked against the CRC its change-log record carries
        (:attr:`LogRecord.data_crc`) as it is read; a piece that is its record's whole data is
        checked by the same pass that makes its extent's checksum.
        """
        extents: list[Extent] = []
        parts: list[bytes] = []
        size = 0
        checked: set[int] = set()
        with segment.path.open("rb") as file:
            fd = file.fileno()
            for piece in merge_adjacent(_pieces(segment)):
                name = self.disks[piece.disk].name
                if piece.kind is not ExtentKind.DATA:
                    extents.append(Extent(name, piece.offset, piece.length, piece.kind, 0, 0))
                else:
                    record = piece.source
                    done = 0
                    while done < piece.length:
                        take = min(BATCH_PAYLOAD_BYTES - size, piece.length - done)
                        start = piece.start + done
                        data = os.pread(fd, take, record.data_position + start)
                        if len(data) != take:
                            raise JournalIntegrityError(
                                f"change-log segment {segment.path} ends inside a write record"
                            )
                        crc = _checked(fd, segment, record, start, data, checked)
                        if is_zero(data):
                            extents.append(
                                Extent(name, piece.offset + done, take, ExtentKind.ZERO, 0, 0)
                            )
                        else:
                            extents.append(
                                Extent(
                                    name,
                                    piece.offset + done,
                                    take,
                                    ExtentKind.DATA,
                                    size,
                                    checksum(data) if crc is None else crc,
                                )
                            )
                            parts.append(data)
                            size += take
                        done += take
                        if size >= BATCH_PAYLOAD_BYTES:
                            yield extents, b"".join(parts)
                            extents, parts, size = [], [], 0
                if len(extents) >= BATCH_MAX_EXTENTS:
                    yield extents, b"".join(parts)
                    extents, parts, size = [], [], 0
        if extents:
            yield extents, b"".join(parts)

    def records(
        self,
        segment: Segment,
        previous_hash: bytes,
        tally: CycleTally,
    ) -> Iterator[bytes]:
        """Encoded WriteBatches, then the CycleCommit; fills ``tally`` as it goes.

        A generator, so a large cycle streams into the transaction instead of into memory.
        """
        mark = segment.cut
        if mark is None:
            raise JournalIntegrityError(f"segment {segment.path} is not sealed; cannot ship it")
        all_extents = tally.extents
        batches = payload_bytes = 0
        for extents, payload in self.extents_and_payloads(segment):
            associated = (
                batch_associated_data(self.vm, self.epoch, segment.cycle, batches, extents)
                if self._packer.cipher is not None
                else b""
            )
            compression, packed, encryption = self._packer.seal(payload, associated)
            record = self.encode(
                WriteBatch(
                    self.vm,
                    self.epoch,
                    segment.cycle,
                    batches,
                    tuple(extents),
                    compression,
                    packed,
                    encryption=encryption,
                )
            )
            batches += 1
            payload_bytes += len(packed)
            all_extents += extents
            tally.wire_bytes += len(record)
            yield record
        commit = CycleCommit(
            vm=self.vm,
            epoch=self.epoch,
            cycle=segment.cycle,
            started_at_ms=mark.started_at_ms,
            cut_at_ms=mark.cut_at_ms,
            batches=batches,
            extents=len(all_extents),
            bytes_written=sum(e.length for e in all_extents),
            payload_bytes=payload_bytes,
            consistency=Consistency.APPLICATION
            if mark.application_consistent
            else Consistency.CRASH,
            disks=self.disks,
            previous_hash=previous_hash,
            cycle_hash=cycle_hash(previous_hash, self.epoch, segment.cycle, all_extents),
        )
        record = self.encode(commit)
        tally.wire_bytes += len(record)
        tally.commit = commit
        yield record


class CycleShipper:
    """Ships one primary VM's sealed cycles through its transactional publisher."""

    def __init__(
        self,
        vm: str,
        topic: str,
        log: ChangeLog,
        publisher: JournalPublisher,
        catalog: Catalog,
        builder: CycleBuilder,
    ) -> None:
        self.vm = vm
        self.topic = topic
        self.log = log
        self.publisher = publisher
        self.catalog = catalog
        self.builder = builder

    async def position(self) -> Position:
        position = await self.catalog.position(self.vm)
        if position is None:
            raise JournalIntegrityError(
                f"VM {self.vm!r} has no shipped position; run its initial replication first"
            )
        return position

    async def reconcile(self, connection: KafkaConnection) -> Position:
        """Adopt cycles that committed in the journal but were not recorded here (crash 3→4)."""
        position = await self.position()
        async for record in read_to_end(connection, self.topic, position.next_offset):
            event = decode_journal(record.value)
            if isinstance(event, CycleCommit) and event.cycle == position.cycle + 1:
                position = Position(
                    event.epoch, event.cycle, event.cycle_hash, record.offset + 1, now_ms()
                )
            else:
                position = Position(
                    position.epoch,
                    position.cycle,
                    position.cycle_hash,
                    record.offset + 1,
                    position.at_ms,
                )
        await self.catalog.advance_position(self.vm, position)
        self.log.drop_through(position.cycle)
        return position

    async def ship(self, segment: Segment) -> ShippedCycle:
        """Publish ``segment`` as the next cycle; steps 1-5 of the module docstring."""
        position = await self.position()
        if segment.cycle != position.cycle + 1:
            raise JournalIntegrityError(
                f"VM {self.vm!r}: change-log segment is cycle {segment.cycle} but the journal "
                f"expects cycle {position.cycle + 1}. Operator action: resynchronize the VM."
            )
        tally = CycleTally()
        records = self.builder.records(segment, position.cycle_hash, tally)
        offsets = await self.publisher.publish(
            self.topic, self.vm.encode(), records, build_in_thread=True
        )
        commit = tally.commit
        if commit is None:
            raise JournalIntegrityError(f"VM {self.vm!r}: cycle {segment.cycle} built no commit")
        shipped = Position(commit.epoch, commit.cycle, commit.cycle_hash, offsets[-1] + 1, now_ms())
        await self.catalog.advance_position(
            self.vm,
            shipped,
            cut_at_ms=commit.cut_at_ms,
            size_bytes=tally.wire_bytes,
            started_at_ms=commit.started_at_ms,
            consistency=DomainConsistency[commit.consistency.name],
        )
        # Deleting a segment and fsyncing the folder is file-system work that need not hold up
        # the event loop (the VM's writes to the open segment go on meanwhile).
        await asyncio.to_thread(self.log.drop_through, segment.cycle)
        return ShippedCycle(
            segment.cycle,
            commit.extents,
            commit.bytes_written,
            commit.payload_bytes,
            tally.wire_bytes,
            offsets[-1],
        )

    async def ship_sealed(self) -> list[ShippedCycle]:
        """Ship every sealed segment, oldest first."""
        return [await self.ship(segment) for segment in list(self.log.sealed_segments())]
