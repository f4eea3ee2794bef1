"""Extended replication: A → B → C, where B relays what it applied to a hop journal that C
replicates; C ends identical to A, and a relay repeated after a crash sends nothing twice."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
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


async def test_a_replica_extends_to_a_third_site(
        tmp_path: Path, bootstrap_servers: str, unique: Callable[[str], str]) -> None:
    group, vm = unique("tg"), unique("vm")

    def config(name: str, trust_group: str) -> SiteConfig:
        return SiteConfig(site=name, root=tmp_path / name, bootstrap_servers=bootstrap_servers,
                          trust_group=trust_group)

    disk = tmp_path / "disk0.img"
    with disk.open("wb") as file:
        file.truncate(8 * MiB)
    async with Site(config("site-a", group)) as a, Site(config("site-b", group)) as b, \
            Site(config("site-c", f"{group}-ext")) as c:
        record = await a.enable(vm, {"disk0": disk}, "site-b", VmSettings(frequency_seconds=30))
        async with a.primary(record) as primary:
            await primary.capture.write("disk0", 0, os.urandom(MiB))
            await primary.initial_replication()
            await primary.capture.write("disk0", 2 * MiB, os.urandom(MiB))
            await primary.replicate()
        await catch_up(b, vm)
        with pytest.raises(ConfigurationError, match="every 300 or 900 seconds"):
            await extend(b, vm, "site-c", 60)
        extension = await extend(b, vm, "site-c", 300)
        async with ExtendedReplication(b, extension) as hop:
            assert await hop.seed() > 0
            async with a.primary(await a.catalog.vm(vm)) as primary:
                for i in range(3):
                    await primary.capture.write("disk0", (4 + i) * MiB, os.urandom(65536))
                    await primary.replicate()
            applied = await catch_up(b, vm)
            relayed = await hop.relay()
            assert relayed == [applied - 2, applied - 1, applied]
            await b.catalog.set_extension_offset(vm, 0)  # as if the recorded offset were lost
            assert await hop.relay() == []
        assert await catch_up(c, vm) == applied
        got = sha256_of(Path((await c.catalog.vm(vm)).disks[0].path))
        assert got == sha256_of(disk)
        assert (await c.catalog.vm(vm)).partner_site == "site-b"


async def test_two_replica_sites_read_one_journal(
        tmp_path: Path, bootstrap_servers: str, unique: Callable[[str], str]) -> None:
    """Fan-out: B and C both replicate A's journal directly; D, not named, does not adopt it."""
    group, vm = unique("tg"), unique("vm")
    sites = {name: Site(SiteConfig(site=name, root=tmp_path / name, trust_group=group,
                                   bootstrap_servers=bootstrap_servers))
             for name in ("site-a", "site-b", "site-c", "site-d")}
    disk = tmp_path / "disk0.img"
    with disk.open("wb") as file:
        file.truncate(4 * MiB)
    for site in sites.values():
        await site.start()
    try:
        a = sites["site-a"]
        record = await a.enable(vm, {"disk0": disk}, "site-b", VmSettings(
            frequency_seconds=30, also_replicate_to=("site-c",)))
        async with a.primary(record) as primary:
            await primary.initial_replication()
            await primary.capture.write("disk0", MiB, os.urandom(MiB))
            await primary.replicate()
        for name in ("site-b", "site-c"):
            await catch_up(sites[name], vm)
            got = sha256_of(Path((await sites[name].catalog.vm(vm)).disks[0].path))
            assert got == sha256_of(disk), name
        assert await sites["site-d"].discover() == []
    finally:
        for site in sites.values():
            await site.stop()
