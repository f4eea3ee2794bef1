"""Resynchronization through the Python API, two sites against the real broker.

A replica whose image was changed behind its back is repaired while the VM keeps writing and
the replica keeps applying, and ends equal to the primary at a cycle boundary; one stopped by a
journal violation (a gap a forger put into the journal) leaves "resynchronization required"
through a resync; digests that do not fit the disks are refused and nothing is sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from tests.fixtures import SitePair, VmFactory
from tests.journal_records import forged_gap
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import ResyncRefused
from vmreplica.failover import journal_events
from vmreplica.failover.resync import ResyncRun, accept_resync
from vmreplica.failover.resync_job import load_job
from vmreplica.journal.kafka import JournalPublisher, StatusPublisher
from vmreplica.producers.primary import PrimaryVm
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import (
    DigestMap,
    EpochStart,
)
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISKS: Final = {"disk0": 8 * MiB, "disk1": 4 * MiB}


@dataclass
class Running:
    """A seeded VM: its primary open at site A, its replica open at site B."""

    vm: str
    a: Site
    b: Site
    primary: PrimaryVm
    replica: ReplicaVm
    disks: dict[str, Path]


@asynccontextmanager
async def running_vm(site_pair: SitePair, vm: VmFactory) -> AsyncIterator[Running]:
    enabled = await vm(
        site_pair.a, DISKS, VmSettings(frequency_seconds=30, continuous_points_hours=1)
    )
    async with site_pair.a.primary(enabled.record) as primary:
        rng = random.Random(7)
        for disk, size in DISKS.items():
            for offset in range(0, size, 256 * KiB):
                await primary.capture.write(disk, offset, rng.randbytes(64 * KiB))
        await primary.initial_replication()
        await primary.capture.write("disk0", 0, os.urandom(64 * KiB))
        await primary.replicate()
        [record] = await site_pair.b.discover()
        async with await site_pair.b.replica(record) as replica:
            await replica.catch_up()
            assert replica.violation is None
            yield Running(enabled.name, site_pair.a, site_pair.b, primary, replica, enabled.disks)


def digests(images: dict[str, Path]) -> dict[str, str]:
    return {name: sha256_of(path) for name, path in images.items()}


def replica_images(run: Running) -> dict[str, Path]:
    return {name: image.path for name, image in run.replica.images.items()}


def corrupt(path: Path, offsets: list[int], length: int) -> int:
    """Overwrite ranges of an image file behind every agent's back; returns the bytes."""
    with path.open("r+b") as file:
        for offset in offsets:
            file.seek(offset)
            file.write(os.urandom(length))
    return len(offsets) * length


async def apply_until(replica: ReplicaVm, done: asyncio.Event) -> None:
    """The replica's agent loop, in short: apply whatever arrives."""
    while not done.is_set():
        await replica.step(0.1)


async def write_meanwhile(primary: PrimaryVm, done: asyncio.Event) -> int:
    """The VM keeps running: writes all over disk0, a cycle now and then."""
    rng = random.Random(11)
    written = 0
    while not done.is_set():
        offset = rng.randrange(0, DISKS["disk0"] - 16 * KiB, 4 * KiB)
        await primary.capture.write("disk0", offset, rng.randbytes(16 * KiB))
        written += 1
        if written % 20 == 0:
            await primary.replicate()
        await asyncio.sleep(0.005)
    return written


async def epoch_starts(site: Site, vm: str) -> list[EpochStart]:
    return [event async for _, event in journal_events(site, vm) if isinstance(event, EpochStart)]


async def test_a_corrupted_replica_is_repaired_while_the_vm_writes(
    site_pair: SitePair, vm: VmFactory
) -> None:
    async with running_vm(site_pair, vm) as run:
        images = replica_images(run)
        assert digests(images) == digests(run.disks)
        corrupted = corrupt(images["disk0"], [4096, 3 * MiB + 512, 7 * MiB], 4096)
        corrupted += corrupt(images["disk1"], [2 * MiB], 64 * KiB)
        assert (await run.b.catalog.points(run.vm)) != []

        job = await accept_resync(run.a, run.vm)
        assert (job.phase, job.target) == ("requested", "site-b")
        assert (await run.a.catalog.vm(run.vm)).state is ReplicationState.RESYNCHRONIZING
        done = asyncio.Event()
        replica = asyncio.create_task(apply_until(run.replica, done))
        writer = asyncio.create_task(write_meanwhile(run.primary, done))
        try:
            finished = await asyncio.wait_for(ResyncRun(run.a, run.primary).run(), 120)
            await asyncio.sleep(0.3)  # a few more writes after the resync cycle
        finally:
            done.set()
            written = await writer
            await replica
        await run.primary.capture.write("disk1", 0, os.urandom(4096))
        last = (await run.primary.replicate())[-1].cycle
        assert await run.replica.catch_up() == last
        assert written > 20

        assert digests(images) == digests(run.disks)
        print(
            f"resync: {corrupted} bytes corrupted, {finished.differing_bytes} differed, "
            f"{finished.resent_bytes} resent, {finished.sent_bytes} sent on the wire "
            f"(disks: {sum(DISKS.values())} bytes)"
        )
        assert finished.phase == "done"
        assert finished.examined_bytes == sum(DISKS.values())
        # Blocks of 64 KiB differ: the four corrupted ones, and those the VM wrote since the
        # replica's digests (the primary's image is compared as it is, live).
        differing = {
            disk: [range(low, high) for low, high in pairs]
            for disk, pairs in finished.differing.items()
        }
        for disk, offset in (
            ("disk0", 0),
            ("disk0", 3 * MiB),
            ("disk0", 7 * MiB),
            ("disk1", 2 * MiB),
        ):
            assert any(offset in block for block in differing[disk]), (disk, offset)
        assert finished.differing_bytes >= 4 * 64 * KiB
        assert load_job(run.a.config.vm_folder(run.vm)) == finished
        [start] = [s for s in await epoch_starts(run.a, run.vm) if s.resync_sites]
        assert (start.resync_sites, start.start_cycle) == (("site-b",), finished.cycle)
        assert (await run.a.catalog.vm(run.vm)).state is ReplicationState.REPLICATING
        record = await run.b.catalog.vm(run.vm)
        assert (record.state, record.epoch) == (ReplicationState.REPLICATING, start.epoch)
        # The points before the resynchronizing cycle held the corrupted blocks.
        assert min(p.cycle for p in await run.b.catalog.points(run.vm)) == finished.cycle


async def test_a_replica_stopped_by_a_journal_violation_leaves_it_through_a_resync(
    site_pair: SitePair, vm: VmFactory
) -> None:
    async with running_vm(site_pair, vm) as run:
        position = await run.b.catalog.position(run.vm)
        assert position is not None
        async with JournalPublisher(run.a.connection, f"forger-{uuid.uuid4().hex}") as forger:
            await forger.publish(
                run.a.journal_topic(run.vm),
                run.vm.encode(),
                forged_gap(run.vm, position.cycle + 1, position.cycle_hash, DISKS),
            )
        await run.replica.catch_up()
        record = await run.b.catalog.vm(run.vm)
        assert record.state is ReplicationState.RESYNCHRONIZATION_REQUIRED
        assert "expected a batch of cycle" in record.state_message
        assert run.replica.violation is not None
        assert not run.replica.stopped  # it waits for the resync, reading on

        # The primary carries on; the replica applies none of it.
        for i in range(3):
            await run.primary.capture.write("disk1", i * MiB, os.urandom(128 * KiB))
            await run.primary.replicate()
        await run.replica.catch_up()
        assert await run.b.catalog.position(run.vm) == position

        await accept_resync(run.a, run.vm)
        done = asyncio.Event()
        replica = asyncio.create_task(apply_until(run.replica, done))
        try:
            finished = await asyncio.wait_for(ResyncRun(run.a, run.primary).run(), 120)
        finally:
            done.set()
            await replica
        await run.replica.catch_up()
        print(
            f"after a violation: {finished.differing_bytes} bytes differed, "
            f"{finished.resent_bytes} resent, {finished.sent_bytes} sent"
        )
        assert digests(replica_images(run)) == digests(run.disks)
        assert run.replica.violation is None
        record = await run.b.catalog.vm(run.vm)
        assert record.state is ReplicationState.REPLICATING
        assert record.state_message == f"resynchronized at cycle {finished.cycle}"
        # Replication goes on as before.
        await run.primary.capture.write("disk0", MiB, os.urandom(64 * KiB))
        last = (await run.primary.replicate())[-1].cycle
        assert await run.replica.catch_up() == last
        assert digests(replica_images(run)) == digests(run.disks)


async def test_digests_that_do_not_fit_the_disk_are_refused(
    site_pair: SitePair, vm: VmFactory
) -> None:
    async with running_vm(site_pair, vm) as run:
        position = await run.a.catalog.position(run.vm)
        assert position is not None
        await accept_resync(run.a, run.vm)
        # A replica (or anything writing the status topic) sends digests of a smaller disk0.
        status = StatusPublisher(run.a.connection)
        await status.start()
        try:
            for name, size in DISKS.items():
                count = (size // (64 * KiB)) - (8 if name == "disk0" else 0)
                await status.publish(
                    run.a.status_topic(run.vm),
                    run.vm.encode(),
                    encode(
                        DigestMap(
                            run.vm, 1, "site-b", name, position.cycle, 64 * KiB, bytes(16 * count)
                        )
                    ),
                )
        finally:
            await status.stop()
        with pytest.raises(ResyncRefused) as refused:
            await asyncio.wait_for(ResyncRun(run.a, run.primary).run(), 60)
        message = (
            f"VM {run.vm!r}: the block digests of disk 'disk0' from site site-b (cycle "
            f"{position.cycle}) hold 1920 bytes (120 digests of 16 bytes) but a disk of "
            f"{DISKS['disk0']} bytes in blocks of 65536 needs 128; they were refused and "
            "nothing was sent. Operator action: check that the disk has the same size on both "
            "sites (a resize that did not replicate), then resync again"
        )
        assert str(refused.value) == message
        job = load_job(run.a.config.vm_folder(run.vm))
        assert job is not None
        assert (job.phase, job.message, job.sent_bytes) == ("refused", message, 0)
        record = await run.a.catalog.vm(run.vm)
        assert record.state is ReplicationState.REPLICATING
        assert [s.epoch for s in await epoch_starts(run.a, run.vm)] == [1]
        assert await run.a.catalog.position(run.vm) == position
