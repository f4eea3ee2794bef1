"""A VM's writes travel primary → Kafka → replica and come out as identical images, through a
plain broker and through a secured one (TLS, SCRAM, each site its own principal with ACLs)."""

from __future__ import annotations

import os

import pytest

from tests.fixtures import SitePair, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture(params=["plain", "secured"])
def broker_security(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_two_disk_vm_replicates_to_identical_images(
    site_pair: SitePair, vm: VmFactory
) -> None:
    site_a, site_b = site_pair.a, site_pair.b
    enabled = await vm(
        site_a, {"disk0": 8 * MiB, "disk1": 8 * MiB}, VmSettings(frequency_seconds=30)
    )
    vm_name, disks = enabled.name, enabled.disks
    async with site_a.primary(enabled.record) as primary:
        await primary.capture.write("disk0", 0, os.urandom(MiB))
        await primary.capture.write("disk1", 7 * MiB, b"x" * MiB)  # the last MiB
        seed = await primary.initial_replication()
        assert seed.bytes_sent > 0
        await primary.capture.write("disk0", 4096, b"y" * 8192)
        await primary.capture.zero("disk1", 7 * MiB, 4096)
        await primary.capture.flush()
        shipped = await primary.replicate()
        assert [c.cycle for c in shipped] == [seed.first_cycle]
        await primary.capture.write("disk0", 2 * MiB, os.urandom(64 * 1024))
        await primary.replicate()
        expected = {name: sha256_of(path) for name, path in disks.items()}

    adopted = await site_b.discover()
    assert [r.name for r in adopted] == [vm_name]
    async with await site_b.replica(adopted[0]) as replica:
        applied = await replica.catch_up()
        assert replica.violation is None
        assert applied == seed.first_cycle + 1
        got = {name: sha256_of(image) for name, image in replica.images.items()}
    assert got == expected
    state = (await site_b.catalog.vm(vm_name)).state
    assert state is ReplicationState.REPLICATING
    points = await site_b.catalog.points(vm_name)
    assert [p.cycle for p in points] == [seed.first_cycle + 1]
