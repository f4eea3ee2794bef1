"""A cycle applied batch by batch: bounded memory, and still all or nothing.

A real materialiser over real images, a real catalog and real undo files (no broker: the
journal records are built by hand, :mod:`tests.journal_records`). The held bound is set small,
so a cycle of a few batches is written into the images before its commit arrives — what a
cycle of GiBs does under the default bound — and every way it can end is checked: committed,
cut off by a crash, refused at its commit or half-way, and under an open test-failover view.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest

from tests.journal_records import Change, cycle_commit, write_batch
from vmreplica.consumers.materializer import Materializer, ReplicaCursor
from vmreplica.consumers.retention import RetentionPolicy
from vmreplica.consumers.views import PointView
from vmreplica.domain.model import DiskRecord, VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import JournalViolation
from vmreplica.journal.kafka import JournalRecord
from vmreplica.schemas.chain import GENESIS_HASH
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import CycleCommit, WriteBatch
from vmreplica.storage.catalog import Catalog
from vmreplica.storage.image import DiskImage

VM: Final = "vm-stream"
EPOCH: Final = 1
KiB: Final = 1024
DISK_BYTES: Final = 1024 * KiB
BATCH_BYTES: Final = 64 * KiB
HELD_BYTES: Final = 100 * KiB
"""Every second batch of 64 KiB goes to the images, long before the commit."""


class Replica:
    def __init__(self, folder: Path, catalog: Catalog) -> None:
        self.folder = folder
        self.catalog = catalog
        self.images = {"disk0": DiskImage.create(folder / "disk0.img", DISK_BYTES)}
        self.offset = 0
        self.materializer = self.new_materializer()

    def new_materializer(self) -> Materializer:
        """What an agent restarted after a crash builds."""
        materializer = Materializer(
            VM, self.images, self.folder / "undo", self.catalog, RetentionPolicy("latest")
        )
        materializer.held_max_bytes = HELD_BYTES
        return materializer

    async def feed(self, events: Sequence[WriteBatch | CycleCommit]) -> None:
        records = []
        for event in events:
            records.append(JournalRecord(self.offset, VM.encode(), encode(event), 0))
            self.offset += 1
        await self.materializer.apply_records(records)

    def digest(self) -> str:
        image = self.images["disk0"]
        return hashlib.sha256(image.read(0, image.size)).hexdigest()


@pytest.fixture
async def replica(tmp_path: Path) -> AsyncIterator[Replica]:
    async with Catalog(tmp_path / "catalog.db") as catalog:
        await catalog.add_vm(
            VM,
            "replica",
            "default",
            "site-a",
            VmSettings(),
            [DiskRecord("disk0", str(tmp_path / "disk0.img"), DISK_BYTES)],
            ReplicationState.REPLICATING,
            EPOCH,
        )
        made = Replica(tmp_path, catalog)
        made.materializer.cursor = ReplicaCursor(EPOCH, 0, GENESIS_HASH, 0, seeding=False)
        try:
            yield made
        finally:
            made.images["disk0"].close()


def cycle(number: int, previous: bytes, batches: int) -> tuple[list[WriteBatch], CycleCommit]:
    """``batches`` batches of one 64 KiB random write each, at distinct offsets."""
    made = [
        write_batch(
            VM, EPOCH, number, i, [Change("disk0", i * BATCH_BYTES, os.urandom(BATCH_BYTES))]
        )
        for i in range(batches)
    ]
    return made, cycle_commit(VM, EPOCH, number, made, previous, {"disk0": DISK_BYTES})


async def applied_first_cycle(replica: Replica) -> tuple[CycleCommit, str]:
    batches, commit = cycle(1, GENESIS_HASH, 3)
    await replica.feed([*batches, commit])
    return commit, replica.digest()


async def test_a_big_cycle_is_written_before_its_commit_and_applied_whole(
    replica: Replica,
) -> None:
    first, _ = await applied_first_cycle(replica)
    batches, commit = cycle(2, first.cycle_hash, 8)
    for batch in batches:  # one fetch per record, as a cycle of GiBs arrives
        await replica.feed([batch])
    undo = replica.materializer.undo
    assert undo.status(2) == "incomplete"
    assert replica.images["disk0"].read(0, BATCH_BYTES) == batches[0].payload  # already written
    assert (await replica.catalog.position(VM)).cycle == 1  # type: ignore[union-attr]
    await replica.feed([commit])
    image = replica.images["disk0"]
    assert image.read(0, 8 * BATCH_BYTES) == b"".join(b.payload for b in batches)
    assert (await replica.catalog.position(VM)).cycle == 2  # type: ignore[union-attr]
    assert [p.cycle for p in await replica.catalog.points(VM)] == [2]
    assert replica.materializer.cursor.applying is None


async def test_a_crash_half_way_through_a_cycle_is_rolled_back_at_start(
    replica: Replica,
) -> None:
    first, at_one = await applied_first_cycle(replica)
    batches, _ = cycle(2, first.cycle_hash, 7)
    await replica.feed(batches)
    assert replica.digest() != at_one  # part of cycle 2 is in the image
    replica.materializer.cursor.applying.close()  # type: ignore[union-attr]
    restarted = replica.new_materializer()  # the agent's next start
    cursor = await restarted.recover()
    assert replica.digest() == at_one
    assert (cursor.cycle, cursor.next_offset) == (1, 4)
    assert restarted.undo.status(2) == "missing"


async def test_a_cycle_failing_its_hash_chain_at_the_commit_leaves_nothing(
    replica: Replica,
) -> None:
    first, at_one = await applied_first_cycle(replica)
    batches, commit = cycle(2, first.cycle_hash, 6)
    forged = replace(commit, cycle_hash=bytes(32))
    with pytest.raises(JournalViolation, match="hash chain mismatch"):
        await replica.feed([*batches, forged])
    assert replica.digest() == at_one
    assert replica.materializer.undo.status(2) == "missing"
    assert replica.materializer.cursor.applying is None
    assert [p.cycle for p in await replica.catalog.points(VM)] == [1]
    assert (await replica.catalog.position(VM)).cycle == 1  # type: ignore[union-attr]


async def test_a_corrupt_batch_half_way_rolls_back_the_batches_before_it(
    replica: Replica,
) -> None:
    first, at_one = await applied_first_cycle(replica)
    batches, _ = cycle(2, first.cycle_hash, 6)
    await replica.feed(batches[:4])
    assert replica.digest() != at_one
    corrupt = replace(batches[4], payload=bytes(BATCH_BYTES))
    with pytest.raises(JournalViolation, match="checksum mismatch"):
        await replica.feed([corrupt])
    assert replica.digest() == at_one
    assert replica.materializer.undo.status(2) == "missing"


async def test_an_open_view_stays_at_its_point_while_a_big_cycle_streams_in(
    replica: Replica,
) -> None:
    first, at_one = await applied_first_cycle(replica)
    batches, commit = cycle(2, first.cycle_hash, 4)
    await replica.feed(batches[:3])  # the view is opened between two fetches
    materializer = replica.materializer
    view = PointView(
        replica.images, materializer.undo, 1, materializer.cursor.cycle, replica.folder / "t"
    )
    materializer.views.append(view)
    try:
        await replica.feed([batches[3], commit])
        content = view.read("disk0", 0, DISK_BYTES)
        assert hashlib.sha256(content).hexdigest() == at_one
    finally:
        materializer.views.remove(view)
        view.close()


async def test_roll_back_interrupted_returns_the_images_to_the_applied_cycle(
    replica: Replica,
) -> None:
    """What an unplanned failover does first, with no agent running: the cycle the agent was
    applying when it stopped goes, whatever was written of it."""
    first, at_one = await applied_first_cycle(replica)
    batches, _ = cycle(2, first.cycle_hash, 5)
    await replica.feed(batches)
    replica.materializer.cursor.applying.close()  # type: ignore[union-attr]
    undo = replica.materializer.undo
    assert undo.roll_back_interrupted(replica.images, 1)
    assert replica.digest() == at_one
    assert not undo.roll_back_interrupted(replica.images, 1)  # nothing left to do
