"""Failover and role swap through the Python API, two sites against the real broker.

Planned failover loses nothing and reverses without a resync; unplanned failover lands exactly on
the chosen point; a returning old primary is fenced, and `reverse` makes it a replica by sending
only what diverged; a zombie primary never changes a replica image.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures import SitePair, VmFactory, catch_up, digests
from vmreplica import failover
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import FencedError, SupersededError
from vmreplica.producers.capture_front import CaptureFront
from vmreplica.runtime.site import Site

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
DISK_BYTES = 8 * MiB


@dataclass
class Pair:
    vm: str
    a: Site
    b: Site
    disks: dict[str, Path]


MakePair = Callable[[VmSettings], Awaitable[Pair]]


@pytest.fixture
def make_pair(site_pair: SitePair, vm: VmFactory) -> MakePair:
    """Sites A and B of one trust group and a two-disk VM enabled on A."""

    async def make(settings: VmSettings) -> Pair:
        enabled = await vm(site_pair.a, {"disk0": DISK_BYTES, "disk1": DISK_BYTES}, settings)
        return Pair(enabled.name, site_pair.a, site_pair.b, enabled.disks)

    return make


async def write_some(site: Site, vm: str, seed: int) -> None:
    async with site.primary(await site.catalog.vm(vm)) as primary:
        rng = os.urandom
        await primary.capture.write("disk0", (seed % 7) * 65536, rng(65536))
        await primary.capture.write("disk1", DISK_BYTES - 4096, rng(4096))
        await primary.capture.flush()
        await primary.replicate()


async def test_planned_failover_and_back_loses_nothing(make_pair: MakePair) -> None:
    pair = await make_pair(VmSettings(frequency_seconds=30))
    vm, a, b = pair.vm, pair.a, pair.b
    async with a.primary(await a.catalog.vm(vm)) as primary:
        await primary.capture.write("disk0", 0, os.urandom(MiB))
        await primary.initial_replication()
    await write_some(a, vm, 1)
    await catch_up(b, vm)

    # A prepares (the VM is stopped), B takes over, A follows as its replica.
    prepared = await failover.prepare_planned(a, vm, verify=True)
    assert [d.name for d in prepared.disk_sha256] == ["disk0", "disk1"]
    at_shutdown = await digests(a, vm)
    async with await b.replica(await b.catalog.vm(vm)) as replica:
        await replica.catch_up()
        received = replica.materializer.prepared
        assert received is not None
        assert dataclasses.replace(received, signature=None) == prepared  # A signed it
    start = await failover.promote(b, vm, prepared=prepared)
    assert await digests(b, vm) == at_shutdown
    found = await failover.newest_epoch(a, vm, 0)
    assert found is not None
    assert dataclasses.replace(found[1], signature=None) == start  # B signed it
    assert await failover.demote(a, vm, found[1], found[0]) == 0
    assert (await a.catalog.vm(vm)).state is ReplicationState.REPLICATING

    # Writes on the new primary replicate back, with no resync in between.
    await write_some(b, vm, 2)
    await catch_up(a, vm)
    assert await digests(a, vm) == await digests(b, vm)

    # Planned failover back restores the original direction.
    prepared = await failover.prepare_planned(b, vm)
    await catch_up(a, vm)
    back = await failover.promote(a, vm, prepared=prepared)
    assert back.primary_site == "site-a"
    found = await failover.newest_epoch(b, vm, 0)
    assert found is not None
    await failover.demote(b, vm, found[1], found[0])
    await write_some(a, vm, 3)
    await catch_up(b, vm)
    assert await digests(b, vm) == await digests(a, vm)
    assert (await a.catalog.vm(vm)).role == "primary"
    assert (await b.catalog.vm(vm)).role == "replica"


async def test_an_old_primary_that_stood_down_joins_when_the_new_primary_reverses(
    make_pair: MakePair,
) -> None:
    """Planned failover without --reverse: A stands down (failed over) and says nothing
    diverged; B replicates on; ``reverse`` at B then needs no wait, and A becomes its replica
    from the takeover on, applying B's cycles with no resync."""
    pair = await make_pair(VmSettings(frequency_seconds=30))
    vm, a, b = pair.vm, pair.a, pair.b
    async with a.primary(await a.catalog.vm(vm)) as primary:
        await primary.initial_replication()
    await write_some(a, vm, 1)
    await catch_up(b, vm)
    prepared = await failover.prepare_planned(a, vm)
    await catch_up(b, vm)
    await failover.promote(b, vm, prepared=prepared)
    assert await failover.follow_takeover(a, vm)
    assert (await a.catalog.vm(vm)).state is ReplicationState.FAILED_OVER
    assert not await failover.follow_reverse(a, vm)  # B has not reversed yet

    await write_some(b, vm, 2)  # B ships cycles nobody applies yet
    result = await failover.reverse(b, vm, wait_seconds=0)
    assert (result.diverged_bytes, result.full_copy) == (0, False)
    assert await failover.follow_reverse(a, vm)
    record = await a.catalog.vm(vm)
    assert (record.role, record.partner_site, record.state) == (
        "replica",
        "site-b",
        ReplicationState.REPLICATING,
    )
    await write_some(b, vm, 3)
    await catch_up(a, vm)
    assert await digests(a, vm) == await digests(b, vm)


async def test_a_scanned_vm_is_scanned_at_the_new_primary_from_the_takeover_point(
    make_pair: MakePair,
) -> None:
    """``--capture scan`` crosses the role swap: B scans after taking over, and its first scan
    sends only the block the VM wrote there, not the whole disk."""
    pair = await make_pair(VmSettings(frequency_seconds=30, capture="scan"))
    vm, a, b = pair.vm, pair.a, pair.b
    with pair.disks["disk0"].open("r+b") as image:  # the hypervisor writes the file
        image.write(os.urandom(MiB))
    async with (
        a.primary(await a.catalog.vm(vm)) as primary,
        CaptureFront(primary, a.config) as front,
    ):
        await front.initial_replication()
        with pair.disks["disk1"].open("r+b") as image:
            image.seek(2 * MiB)
            image.write(os.urandom(65536))
        [cycle] = await front.cycle()
        assert cycle.bytes_written == 65536
    await catch_up(b, vm)
    assert (await b.catalog.vm(vm)).settings.capture == "scan"

    prepared = await failover.prepare_planned(a, vm, reverse=True)
    await catch_up(b, vm)
    await failover.promote(b, vm, prepared=prepared)
    assert await failover.follow_takeover(a, vm)
    assert (await a.catalog.vm(vm)).role == "replica"

    record = await b.catalog.vm(vm)
    assert record.settings.capture == "scan"
    images = {d.name: Path(d.path) for d in record.disks}
    with images["disk0"].open("r+b") as image:  # the VM, started at B, writes its disk
        image.seek(5 * MiB)
        image.write(os.urandom(65536))
    async with b.primary(record) as primary, CaptureFront(primary, b.config) as front:
        [cycle] = await front.cycle()
        assert cycle.bytes_written == 65536  # without the takeover's digests: every block
    await catch_up(a, vm)
    assert await digests(a, vm) == await digests(b, vm)


async def test_unplanned_failover_to_latest_and_older_point_then_reverse(
    make_pair: MakePair,
) -> None:
    pair = await make_pair(VmSettings(frequency_seconds=30, continuous_points_hours=1))
    vm, a, b = pair.vm, pair.a, pair.b
    recorded: dict[int, dict[str, str]] = {}
    async with a.primary(await a.catalog.vm(vm)) as primary:
        await primary.initial_replication()
        for i in range(5):
            await primary.capture.write("disk0", i * 65536, os.urandom(65536))
            await primary.capture.write("disk1", 0, os.urandom(4096))
            for cycle in await primary.replicate():
                recorded[cycle.cycle] = await digests(a, vm)
        # Writes that never reach the replica: the primary dies before shipping them.
        await primary.capture.write("disk0", 3 * MiB, b"\x77" * 65536)
        await primary.capture.flush()
    await catch_up(b, vm)
    cycles = sorted(recorded)
    older = cycles[1]

    # Failover to an older point, cancel (replay forward), then fail over to the latest.
    await failover.promote(b, vm, point=str(older), force=True)
    assert await digests(b, vm) == recorded[older]
    await failover.cancel(b, vm)
    await catch_up(b, vm)
    assert await digests(b, vm) == recorded[cycles[-1]]
    start = await failover.promote(b, vm, point="latest", force=True)
    assert await digests(b, vm) == recorded[cycles[-1]]
    await failover.complete(b, vm)
    assert (await b.catalog.vm(vm)).state is ReplicationState.FAILED_OVER

    # The new primary writes; the old one returns and is fenced before it can publish.
    async with b.primary(await b.catalog.vm(vm)) as new_primary:
        await new_primary.capture.write("disk1", 2 * MiB, os.urandom(32768))
        await new_primary.capture.flush()
    with pytest.raises(SupersededError, match="became primary in epoch"):
        async with a.primary(await a.catalog.vm(vm)):
            pass
    found = await failover.newest_epoch(a, vm, 0)
    assert found is not None
    assert found[1].epoch == start.epoch
    diverged_a = await failover.demote(a, vm, found[1], found[0])
    assert diverged_a == 65536
    result = await failover.reverse(b, vm)
    print(f"reverse: diverged {result.diverged_bytes} bytes, sent {result.sent_bytes} bytes")
    assert not result.full_copy
    assert result.diverged_bytes == 65536 + 32768
    assert result.sent_bytes <= 2 * result.diverged_bytes
    await catch_up(a, vm)
    assert await digests(a, vm) == await digests(b, vm)
    assert (await a.catalog.vm(vm)).state is ReplicationState.REPLICATING


async def test_zombie_primary_never_changes_a_replica(make_pair: MakePair) -> None:
    pair = await make_pair(VmSettings(frequency_seconds=30))
    vm, a, b = pair.vm, pair.a, pair.b
    zombie = a.primary(await a.catalog.vm(vm))
    await zombie.start()
    try:
        await zombie.initial_replication()
        await zombie.capture.write("disk0", 0, os.urandom(65536))
        await zombie.replicate()
        await catch_up(b, vm)
        await failover.promote(b, vm, force=True)
        await failover.complete(b, vm)
        before = await digests(b, vm)
        # The zombie keeps writing and tries to ship: the broker has fenced its producer.
        await zombie.capture.write("disk0", 0, b"\xee" * 65536)
        with pytest.raises(FencedError):
            await zombie.replicate()
        with pytest.raises(FencedError):
            await zombie.capture.write("disk0", 0, b"\xee" * 4096)
    finally:
        await zombie.stop()
    assert await digests(b, vm) == before


async def test_planned_failover_cancelled_before_the_takeover(make_pair: MakePair) -> None:
    pair = await make_pair(VmSettings(frequency_seconds=30))
    vm, a, b = pair.vm, pair.a, pair.b
    async with a.primary(await a.catalog.vm(vm)) as primary:
        await primary.initial_replication()
    await failover.prepare_planned(a, vm, reverse=True)
    await failover.cancel_planned(a, vm)
    assert (await a.catalog.vm(vm)).state is ReplicationState.REPLICATING
    await write_some(a, vm, 4)
    await b.discover()
    async with await b.replica(await b.catalog.vm(vm)) as replica:
        await replica.catch_up()
        assert replica.materializer.prepared is None
    assert (await b.catalog.vm(vm)).role == "replica"
    assert await digests(b, vm) == await digests(a, vm)


async def test_reverse_falls_back_to_block_compare_when_the_diverged_set_is_unknown(
    make_pair: MakePair,
) -> None:
    pair = await make_pair(VmSettings(frequency_seconds=30, continuous_points_hours=1))
    vm, a, b = pair.vm, pair.a, pair.b
    async with a.primary(await a.catalog.vm(vm)) as primary:
        await primary.initial_replication()
        await primary.capture.write("disk0", 0, os.urandom(MiB))
        await primary.replicate()
        await primary.capture.write("disk0", 3 * MiB, b"\x42" * 65536)  # never ships
        await primary.capture.flush()
    await catch_up(b, vm)
    await failover.promote(b, vm, force=True)
    await failover.complete(b, vm)
    # The old primary lost its change log: it cannot say what diverged.
    shutil.rmtree(a.config.vm_folder(vm) / "changelog")
    found = await failover.newest_epoch(a, vm, 0)
    assert found is not None
    await failover.demote(a, vm, found[1], found[0])
    result = await failover.reverse(b, vm)
    print(f"block compare: {result.diverged_bytes} bytes differ, {result.sent_bytes} sent")
    assert not result.full_copy
    assert result.diverged_bytes == 65536
    await catch_up(a, vm)
    assert await digests(a, vm) == await digests(b, vm)
