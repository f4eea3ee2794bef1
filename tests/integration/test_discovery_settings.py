"""Which journals a replica site adopts, on a real broker: none while it is not a replica
server (`server set --no-replica`), and never again one removed there (`vmreplica remove`)
until it is enabled there anew."""

from __future__ import annotations

import pytest

from tests.fixtures import SiteFactory, VmFactory
from vmreplica.domain.model import VmSettings
from vmreplica.runtime.removal import remove_replication

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


async def test_discovery_honours_replica_enabled_and_removals(
    sites: SiteFactory, vm: VmFactory
) -> None:
    site_a = await sites.start("site-a")
    enabled = await vm(site_a, {"disk0": MiB}, VmSettings(frequency_seconds=30))
    async with site_a.primary(await site_a.catalog.vm(enabled.name)) as primary:
        await primary.initial_replication()  # the journal now holds its VmConfig

    async with sites.site("site-b", replica_enabled=False) as closed:
        assert await closed.discover() == []
        assert await closed.catalog.find_vm(enabled.name) is None

    async with sites.site("site-b") as site_b:
        (adopted,) = await site_b.discover()
        assert adopted.name == enabled.name
        said = await remove_replication(site_b, enabled.name)
        assert f"replication of VM {enabled.name} removed at site site-b" in said
        assert await site_b.discover() == []
        assert await site_b.catalog.find_vm(enabled.name) is None
