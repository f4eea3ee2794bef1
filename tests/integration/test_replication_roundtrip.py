"""A VM's writes travel primary → Kafka → replica and come out as identical images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmreplica.config import SiteConfig
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.runtime.site import Site
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


async def test_two_disk_vm_replicates_to_identical_images(
        tmp_path: Path, bootstrap_servers: str, unique: Callable[[str], str]) -> None:
    vm = unique("vm")
    group = unique("tg")
    primary_config = SiteConfig(site="site-a", root=tmp_path / "a",
                                bootstrap_servers=bootstrap_servers, trust_group=group)
    replica_config = SiteConfig(site="site-b", root=tmp_path / "b",
                                bootstrap_servers=bootstrap_servers, trust_group=group)
    disks = {"disk0": tmp_path / "disk0.img", "disk1": tmp_path / "disk1.img"}
    for path in disks.values():
        with path.open("wb") as file:
            file.truncate(8 * MiB)
    async with Site(primary_config) as site_a, Site(replica_config) as site_b:
        record = await site_a.enable(vm, disks, "site-b", VmSettings(frequency_seconds=30))
        async with site_a.primary(record) as primary:
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
        assert [r.name for r in adopted] == [vm]
        async with await site_b.replica(adopted[0]) as replica:
            applied = await replica.catch_up()
            assert replica.violation is None
            assert applied == seed.first_cycle + 1
            got = {name: sha256_of(image) for name, image in replica.images.items()}
        assert got == expected
        state = (await site_b.catalog.vm(vm)).state
        assert state is ReplicationState.REPLICATING
        points = await site_b.catalog.points(vm)
        assert [p.cycle for p in points] == [seed.first_cycle + 1]
