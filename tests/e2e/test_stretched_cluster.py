"""A Kafka cluster stretched over three sites loses the primary's site, and nothing committed.

The cluster is ``vmreplica broker up --brokers 3 --sites site-a,site-b,site-c``: one node per
site (its ``broker.rack``), so each of the VM's topics keeps one replica per site, two of which
must acknowledge a write (``min.insync.replicas`` 2), and the KRaft quorum keeps two voters of
three. The primary (a deterministic workload in its own process, so the disks at every cycle are
known) runs at site A; then site A is lost — the primary and site A's broker SIGKILLed together.
On the two surviving brokers, site B catches up and fails over to its latest point, which must
be the primary's last committed cycle exactly. Then site A returns: its broker rejoins, its old
primary is fenced the moment it opens, stands down, and ``reverse`` makes it B's replica.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Final

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.clusters import own_cluster, state_of
from tests.e2e.primary_worker import DISKS
from tests.e2e.test_unplanned_after_kill import expected_digests, run_primary_until_killed
from tests.fixtures import SiteFactory, VmFactory, catch_up, digests
from vmreplica import failover
from vmreplica.devtools.cluster import LocalCluster
from vmreplica.domain import names
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.errors import SupersededError

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SITES: Final = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="module")
def stretched() -> Iterator[LocalCluster]:
    with own_cluster(3, sites=SITES) as cluster:
        yield cluster


@pytest.fixture
def bootstrap_servers(stretched: LocalCluster) -> str:
    return state_of(stretched).bootstrap_servers


async def replicas_by_site(bootstrap_servers: str, topic: str) -> dict[str, int]:
    """How many replicas of ``topic``'s partition stand in each site (broker rack)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        racks = {broker["node_id"]: broker["rack"] for broker in cluster["brokers"]}
        [described] = await admin.describe_topics([topic])
        [partition] = described["partitions"]
        found: dict[str, int] = {}
        for node in partition["replicas"]:
            found[racks[node]] = found.get(racks[node], 0) + 1
        return found
    finally:
        await admin.close()


async def test_losing_the_primary_site_loses_no_committed_cycle_and_the_site_returns_as_replica(
    stretched: LocalCluster, sites: SiteFactory, vm: VmFactory
) -> None:
    config_a = sites.config_file("site-a", replication_factor=3)
    async with sites.site("site-a", replication_factor=3) as a:
        enabled = await vm(a, DISKS, VmSettings(frequency_seconds=30, continuous_points_hours=1))
        name = enabled.name
        async with a.primary(enabled.record) as primary:
            await primary.initial_replication()
    journal = names.journal_topic(name, sites.trust_group)
    bootstrap = state_of(stretched).bootstrap_servers
    assert await replicas_by_site(bootstrap, journal) == dict.fromkeys(SITES, 1)

    # Site A is lost: its primary mid-cycle, and its broker, both SIGKILLed.
    at_cut = await run_primary_until_killed(config_a, name, cycles=4)
    stretched.stop_nodes(stretched.nodes_at("site-a"), kill=True)
    last = max(at_cut)
    print(f"\nsite A lost after cycle {last} ({len(at_cut)} cycles shipped)")

    # On the surviving brokers: B applies every committed cycle and fails over to the last one.
    async with sites.site("site-b", replication_factor=3) as b:
        assert await catch_up(b, name) == last
        start = await failover.promote(b, name, point="latest", force=True)
        assert await digests(b, name) == expected_digests(at_cut[last])
        await failover.complete(b, name)
        async with b.primary(await b.catalog.vm(name)) as new_primary:
            await new_primary.capture.write("disk0", 0, os.urandom(65536))
            await new_primary.capture.flush()

        # Site A returns: its broker rejoins; its old primary is fenced as it opens.
        await asyncio.to_thread(stretched.start_nodes)
        async with sites.site("site-a", replication_factor=3) as a:
            with pytest.raises(SupersededError, match="became primary in epoch"):
                async with a.primary(await a.catalog.vm(name)):
                    pass
            found = await failover.newest_epoch(a, name, 0)
            assert found is not None
            assert found[1].epoch == start.epoch
            await failover.demote(a, name, found[1], found[0])
            result = await failover.reverse(b, name)
            print(f"reverse: diverged {result.diverged_bytes} bytes, sent {result.sent_bytes}")
            await catch_up(a, name)
            assert await digests(a, name) == await digests(b, name)
            assert (await a.catalog.vm(name)).state is ReplicationState.REPLICATING
