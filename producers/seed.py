"""Initial replication: the first full copy, sparse-aware and resumable, in one of three modes
(``VmSettings.initial``, carried to the replica in ``VmConfig.initial``).

``network`` sends the copy through the journal:

1. cut the change log and drop what it held: those writes are in the image the seed reads;
2. publish EpochStart and VmConfig (first run only): the replica learns the epoch and the
   number of the first cycle that will follow the seed;
3. send every allocated, non-zero chunk of every disk as SeedChunk records, several MiB per
   transaction, recording after each transaction how far each disk got (an interrupted seed
   resumes there);
4. publish the final ``done`` chunk and record the starting position.

Writes the VM makes meanwhile keep going to the change log and ship as ordinary cycles after the
seed: every region they touch is then overwritten with its newest content, so the replica is
exact at the first cycle boundary after the seed.

Step 3 and the ``done`` chunk are :class:`Seeder`, which also seeds an extended-replication hop.

``export`` and ``existing`` make steps 1 and 2 only, and record the position after them: the
cycles that follow ship at once. With ``export`` the copy travels on external media
(``vmreplica initial export`` here, ``vmreplica initial import`` at the replica, which then
applies those cycles: :mod:`vmreplica.runtime.initial`); with ``existing`` the replica holds a
copy already, and asks for the blocks that differ by sending its block digests
(:mod:`vmreplica.consumers.seeding`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Position
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.producers.capture import CapturedVm
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.events import (
    Compression,
    DiskSize,
    EpochStart,
    SeedChunk,
    VmConfig,
)
from vmreplica.schemas.payload import PayloadPacker, checksum, seed_associated_data
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage, nonzero_chunks

SEED_CHUNK_BYTES: Final = 4 * 1024 * 1024
"""Uncompressed data per SeedChunk: aligned pieces of the allocated, non-zero parts of a disk."""
SEED_TRANSACTION_BYTES: Final = 64 * 1024 * 1024
"""Progress is recorded per transaction: at most this much is re-sent after an interruption."""

Progress = Callable[[int, int], None]
"""Called with (bytes examined, bytes to examine) as the seed advances."""
Committed = Callable[[int], Awaitable[None]]
"""Called after each transaction of a disk with the offset the disk's seed reached."""


@dataclass(frozen=True)
class SeedResult:
    bytes_examined: int
    bytes_sent: int
    chunks: int
    first_cycle: int


class Seeder:
    """Sends disk images through a journal as SeedChunk records: the one seeder.

    The initial replication of a primary VM (:class:`InitialReplication`) and the first copy of
    an extended-replication hop (:mod:`vmreplica.runtime.extension`) both seed with it. Chunks
    are :data:`SEED_CHUNK_BYTES` pieces of the allocated, non-zero parts of a disk (holes and
    zero blocks are never sent; the replica's image starts as holes), packed as the shipper packs
    its batches (:mod:`vmreplica.schemas.payload`) and published several MiB per transaction.
    """

    def __init__(
        self, publisher: JournalPublisher, topic: str, vm: str, epoch: int, seed_id: str
    ) -> None:
        self.publisher = publisher
        self.topic = topic
        self.vm = vm
        self.epoch = epoch
        self.seed_id = seed_id
        self.bytes_sent = 0
        """Payload bytes published so far (after compression)."""
        self.chunks = 0
        self._key = vm.encode()
        self._packer = PayloadPacker(cipher=publisher.cipher)

    async def send_disk(
        self,
        disk: str,
        image: DiskImage,
        start: int = 0,
        *,
        committed: Committed | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Send ``image`` from offset ``start`` as the chunks of ``disk``.

        ``committed`` is awaited after every transaction but the disk's last with the offset it
        reached (where an interrupted seed may resume); ``progress`` is called after every chunk
        with the offset examined so far.
        """
        pending: list[bytes] = []
        pending_bytes = 0
        for offset, data in nonzero_chunks(image, start, SEED_CHUNK_BYTES):
            crc = checksum(data)
            associated = (
                seed_associated_data(
                    self.vm, self.epoch, self.seed_id, disk, offset, len(data), crc
                )
                if self._packer.cipher is not None
                else b""
            )
            compression, packed, encryption = self._packer.seal(data, associated)
            pending.append(
                self.publisher.encode(
                    SeedChunk(
                        self.vm,
                        self.epoch,
                        disk,
                        offset,
                        len(data),
                        compression,
                        packed,
                        crc,
                        self.seed_id,
                        False,
                        encryption=encryption,
                    )
                )
            )
            pending_bytes += len(packed)
            self.chunks += 1
            reached = offset + len(data)
            if pending_bytes >= SEED_TRANSACTION_BYTES:
                await self.publisher.publish(self.topic, self._key, pending)
                if committed is not None:
                    await committed(reached)
                self.bytes_sent += pending_bytes
                pending, pending_bytes = [], 0
            if progress is not None:
                progress(reached)
        if pending:
            await self.publisher.publish(self.topic, self._key, pending)
            self.bytes_sent += pending_bytes

    async def finish(self) -> int:
        """Publish the ``done`` chunk that ends the seed; return its journal offset."""
        final = SeedChunk(
            self.vm, self.epoch, "", 0, 0, Compression.NONE, b"", 0, self.seed_id, True
        )
        offsets = await self.publisher.publish(
            self.topic, self._key, [self.publisher.encode(final)]
        )
        return offsets[-1]


class InitialReplication:
    """Seeds one VM's replica through its journal."""

    def __init__(
        self,
        vm: CapturedVm,
        publisher: JournalPublisher,
        topic: str,
        catalog: Catalog,
        config: VmConfig,
        primary_site: str,
    ) -> None:
        self.vm = vm
        self.publisher = publisher
        self.topic = topic
        self.catalog = catalog
        self.config = config
        self.primary_site = primary_site

    async def run(self, progress: Progress | None = None) -> SeedResult:
        vm = self.vm
        epoch = self.config.epoch
        done = await self.catalog.seed_progress(vm.name)
        key = vm.name.encode()
        if not done:
            first_cycle = vm.cut()  # step 1
            vm.log.drop_through(first_cycle)
            first_cycle += 1
            start = EpochStart(
                vm.name,
                epoch,
                0,
                self.primary_site,
                first_cycle,
                "initial replication",
                now_ms(),
                GENESIS_HASH,
            )
            offsets = await self.publisher.publish(
                self.topic, key, [self.publisher.encode(start), self.publisher.encode(self.config)]
            )
            for name in vm.disk_names:  # step 2 is recorded with the start offsets
                await self.catalog.set_seed_progress(vm.name, name, 0)
            await self.catalog.set_seed_progress(vm.name, "", first_cycle)
            done = await self.catalog.seed_progress(vm.name)
            after_start = offsets[-1] + 1
        else:
            after_start = 0  # resumed: reconciling reads the journal from its start
        first_cycle = done.pop("")
        if self.config.initial != "network":  # the copy travels another way
            if await self.catalog.position(vm.name) is None:
                await self.catalog.advance_position(
                    vm.name, Position(epoch, first_cycle - 1, GENESIS_HASH, after_start, now_ms())
                )
            return SeedResult(sum(image.size for image in vm.images), 0, 0, first_cycle)
        seeder = Seeder(
            self.publisher,
            self.topic,
            vm.name,
            epoch,
            f"{vm.name}-{first_cycle}-{uuid.uuid4().hex[:8]}",
        )
        total = sum(image.size for image in vm.images)
        examined = sum(done.values())
        for index, name in enumerate(vm.disk_names):  # step 3

            async def committed(reached: int, name: str = name) -> None:
                await self.catalog.set_seed_progress(vm.name, name, reached)

            def advanced(reached: int, examined: int = examined) -> None:
                if progress is not None:
                    progress(examined + reached, total)

            await seeder.send_disk(
                name, vm.images[index], done.get(name, 0), committed=committed, progress=advanced
            )
            await self.catalog.set_seed_progress(vm.name, name, vm.images[index].size)
            examined += vm.images[index].size - done.get(name, 0)
            if progress is not None:
                progress(examined, total)
        final_offset = await seeder.finish()  # step 4
        await self.catalog.advance_position(
            vm.name, Position(epoch, first_cycle - 1, GENESIS_HASH, final_offset + 1, now_ms())
        )
        return SeedResult(total, seeder.bytes_sent, seeder.chunks, first_cycle)


def disk_sizes(vm: CapturedVm) -> tuple[DiskSize, ...]:
    return tuple(
        DiskSize(name, image.size) for name, image in zip(vm.disk_names, vm.images, strict=True)
    )
