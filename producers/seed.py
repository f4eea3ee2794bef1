"""Initial replication over the network: the first full copy, sparse-aware and resumable.

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
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import zstandard

from vmreplica.domain.clock import now_ms
from vmreplica.domain.model import Position
from vmreplica.journal.kafka import JournalPublisher
from vmreplica.producers.capture import CapturedVm
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import (
    Compression,
    DiskSize,
    EpochStart,
    SeedChunk,
    VmConfig,
)
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import nonzero_chunks

SEED_CHUNK_BYTES: Final = 4 * 1024 * 1024
SEED_TRANSACTION_BYTES: Final = 64 * 1024 * 1024
"""Progress is recorded per transaction: at most this much is re-sent after an interruption."""

Progress = Callable[[int, int], None]
"""Called with (bytes examined, bytes to examine) as the seed advances."""


@dataclass(frozen=True)
class SeedResult:
    bytes_examined: int
    bytes_sent: int
    chunks: int
    first_cycle: int


class InitialReplication:
    """Seeds one VM's replica through its journal."""

    def __init__(self, vm: CapturedVm, publisher: JournalPublisher, topic: str,
                 catalog: Catalog, config: VmConfig, primary_site: str) -> None:
        self.vm = vm
        self.publisher = publisher
        self.topic = topic
        self.catalog = catalog
        self.config = config
        self.primary_site = primary_site
        self._compressor = zstandard.ZstdCompressor(level=1)

    def _chunks(self, disk: int, start: int) -> Iterator[tuple[int, bytes]]:
        return nonzero_chunks(self.vm.images[disk], start, SEED_CHUNK_BYTES)

    async def run(self, progress: Progress | None = None) -> SeedResult:
        vm = self.vm
        epoch = self.config.epoch
        done = await self.catalog.seed_progress(vm.name)
        key = vm.name.encode()
        if not done:
            first_cycle = vm.cut()  # step 1
            vm.log.drop_through(first_cycle)
            first_cycle += 1
            start = EpochStart(vm.name, epoch, 0, self.primary_site, first_cycle,
                               "initial replication", now_ms(), GENESIS_HASH)
            await self.publisher.publish(self.topic, key, [encode(start), encode(self.config)])
            for name in vm.disk_names:  # step 2 is recorded with the start offsets
                await self.catalog.set_seed_progress(vm.name, name, 0)
            await self.catalog.set_seed_progress(vm.name, "", first_cycle)
            done = await self.catalog.seed_progress(vm.name)
        first_cycle = done.pop("")
        seed_id = f"{vm.name}-{first_cycle}-{uuid.uuid4().hex[:8]}"
        total = sum(image.size for image in vm.images)
        examined = sum(done.values())
        sent = chunks = 0
        for index, name in enumerate(vm.disk_names):  # step 3
            pending: list[bytes] = []
            pending_bytes = 0
            last_offset = done.get(name, 0)
            for offset, data in self._chunks(index, done.get(name, 0)):
                packed = self._compressor.compress(data)
                compression = Compression.ZSTD
                if len(packed) >= len(data):
                    packed, compression = data, Compression.NONE
                pending.append(encode(SeedChunk(
                    vm.name, epoch, name, offset, len(data), compression, packed,
                    zlib.crc32(data), seed_id, False)))
                pending_bytes += len(packed)
                chunks += 1
                last_offset = offset + len(data)
                if pending_bytes >= SEED_TRANSACTION_BYTES:
                    await self.publisher.publish(self.topic, key, pending)
                    await self.catalog.set_seed_progress(vm.name, name, last_offset)
                    sent += pending_bytes
                    pending, pending_bytes = [], 0
                if progress is not None:
                    progress(examined + last_offset, total)
            if pending:
                await self.publisher.publish(self.topic, key, pending)
                sent += pending_bytes
            await self.catalog.set_seed_progress(vm.name, name, vm.images[index].size)
            examined += vm.images[index].size - done.get(name, 0)
            if progress is not None:
                progress(examined, total)
        final = SeedChunk(vm.name, epoch, "", 0, 0, Compression.NONE, b"", 0, seed_id, True)
        offsets = await self.publisher.publish(self.topic, key, [encode(final)])  # step 4
        await self.catalog.advance_position(vm.name, Position(
            epoch, first_cycle - 1, GENESIS_HASH, offsets[-1] + 1, now_ms()))
        return SeedResult(total, sent, chunks, first_cycle)


def disk_sizes(vm: CapturedVm) -> tuple[DiskSize, ...]:
    return tuple(DiskSize(name, image.size) for name, image in zip(
        vm.disk_names, vm.images, strict=True))
