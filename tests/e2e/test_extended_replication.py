"""Extended replication: A → B → C, where B relays what it applied to a hop journal that C
replicates; C ends identical to A, and a relay repeated after a crash sends nothing twice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.errors import ConfigurationError
from vmreplica.runtime.extension import ExtendedReplication, extend
from vmreplica.runtime.site import Site
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


async def catch_up(site: Site, vm: str) -> int:
    if await site.catalog.find_vm(vm) is None:
        assert [r.name for r in await site.discover()] == [vm]
    async with await site.replica(await site.catalog.vm(vm)) as replica:
        cycle = await replica.catch_up()
        assert replica.violation is None, replica.violation
        return cycle


async def test_a_replica_extends_to_a_third_site(sites: SiteFactory, vm: VmFactory) -> None:
    group = sites.trust_group
    async with (
        sites.site("site-a") as a,
        sites.site("site-b") as b,
        sites.site("site-c", trust_group=f"{group}-ext") as c,
    ):
        enabled = await vm(a, {"disk0": 8 * MiB}, VmSettings(frequency_seconds=30))
        vm_name, record, disk = enabled.name, enabled.record, enabled.disks["disk0"]
        async with a.primary(record) as primary:
            await primary.capture.write("disk0", 0, os.urandom(MiB))
            await primary.initial_replication()
            await primary.capture.write("disk0", 2 * MiB, os.urandom(MiB))
            await primary.replicate()
        await catch_up(b, vm_name)
        with pytest.raises(ConfigurationError, match="every 300 or 900 seconds"):
            await extend(b, vm_name, "site-c", 60)
        extension = await extend(b, vm_name, "site-c", 300)
        async with ExtendedReplication(b, extension) as hop:
            assert await hop.seed() > 0
            async with a.primary(await a.catalog.vm(vm_name)) as primary:
                for i in range(3):
                    await primary.capture.write("disk0", (4 + i) * MiB, os.urandom(65536))
                    await primary.replicate()
            applied = await catch_up(b, vm_name)
            relayed = await hop.relay()
            assert relayed == [applied - 2, applied - 1, applied]
            await b.catalog.set_extension_offset(vm_name, 0)  # as if the recorded offset were lost
            assert await hop.relay() == []
        assert await catch_up(c, vm_name) == applied
        got = sha256_of(Path((await c.catalog.vm(vm_name)).disks[0].path))
        assert got == sha256_of(disk)
        assert (await c.catalog.vm(vm_name)).partner_site == "site-b"


async def test_two_replica_sites_read_one_journal(sites: SiteFactory, vm: VmFactory) -> None:
    """Fan-out: B and C both replicate A's journal directly; D, not named, does not adopt it."""
    started = {name: await sites.start(name) for name in ("site-a", "site-b", "site-c", "site-d")}
    a = started["site-a"]
    enabled = await vm(
        a, {"disk0": 4 * MiB}, VmSettings(frequency_seconds=30, also_replicate_to=("site-c",))
    )
    vm_name, record, disk = enabled.name, enabled.record, enabled.disks["disk0"]
    async with a.primary(record) as primary:
        await primary.initial_replication()
        await primary.capture.write("disk0", MiB, os.urandom(MiB))
        await primary.replicate()
    for name in ("site-b", "site-c"):
        await catch_up(started[name], vm_name)
        got = sha256_of(Path((await started[name].catalog.vm(vm_name)).disks[0].path))
        assert got == sha256_of(disk), name
    assert await started["site-d"].discover() == []
