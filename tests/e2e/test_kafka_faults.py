"""A three-broker Kafka cluster under faults, with both sites' agents running as processes.

The cluster is the project's own (``LocalCluster.up(3)``, as ``vmreplica broker up --brokers 3``
starts it); the VM's topics have replication factor 3 and ``min.insync.replicas`` 2. The
primary site reaches Kafka through :class:`~tests.e2e.kafka_link.KafkaLink` (the cluster's
routed listener is advertised at the link's ports), so the test can cut that site off while the
replica site and the brokers carry on. A light write load goes through the primary's NBD export
all along, and must never fail: no Kafka fault may stop the VM's disk.

Each fault — one broker SIGKILLed (then restarted), every broker stopped for
:data:`ALL_STOPPED_SECONDS`, the primary's link black-holed for :data:`CUT_SECONDS` — must show
in ``vmreplica status --json`` as warning or critical health with its reason; the agents back
off without a traceback; replication resumes by itself; and the test ends with the replica equal
to the primary at a cycle boundary (``qemu-img compare``), the journal's cycles consecutive, and
the replica's applied cycles consecutive up to the last.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.clusters import own_cluster, state_of
from tests.e2e.agent_pair import MiB, Pair, Writer, replicating_pair, status_of, wait_for_health
from tests.e2e.clients import require, wait_until
from tests.e2e.kafka_link import KafkaLink
from vmreplica.devtools.cluster import ClusterState, LocalCluster
from vmreplica.domain import names
from vmreplica.journal.kafka import STALL_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ALL_STOPPED_SECONDS: Final = 60.0
"""How long every broker stays down in the all-brokers test."""
CUT_SECONDS: Final = STALL_SECONDS + 10
"""How long the primary's link stays cut: many cycles (one a second), and long enough for the
primary to give up its stalled publish and say so."""
DISK_BYTES: Final = 32 * MiB


@dataclass(frozen=True)
class Cluster:
    local: LocalCluster
    state: ClusterState

    @property
    def bootstrap_servers(self) -> str:
        return self.state.bootstrap_servers

    @property
    def routed_bootstrap_servers(self) -> str:
        routed = self.state.routed_bootstrap_servers
        assert routed is not None
        return routed


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Three brokers with a routed listener, under a private home, for this module."""
    with own_cluster(3, routed=True) as local:
        yield Cluster(local, state_of(local))


@dataclass
class Run:
    """One test's cluster, link, pair of agents and write load."""

    cluster: Cluster
    link: KafkaLink
    pair: Pair
    writer: Writer
    trust_group: str

    @property
    def journal(self) -> str:
        return names.journal_topic(self.pair.vm, self.trust_group)

    async def replication_advances(self, by: int = 3, seconds: float = 120.0) -> None:
        """Wait until the replica applied ``by`` more cycles than it has now."""
        start = await self.pair.applied()

        async def advanced() -> bool:
            return await self.pair.applied() >= start + by

        await wait_until(advanced, f"the replica to apply {by} more cycles", seconds)

    async def finish(self) -> None:
        """Stop writing; the replica equals the primary at a cycle boundary; no cycle lost or
        applied twice; the VM's disk never failed a write; no agent logged a traceback."""
        await self.writer.stop()
        assert self.writer.written > 0
        assert self.writer.failures == [], self.writer.failures[:3]
        await self.pair.settled()
        await self.pair.assert_identical()
        await self.pair.assert_cycles_exact(self.cluster.bootstrap_servers, self.journal)
        self.pair.agent_a.assert_no_traceback()
        self.pair.agent_b.assert_no_traceback()


@pytest.fixture
async def run(cluster: Cluster, short_dir: Path) -> AsyncIterator[Run]:
    require("qemu-io")
    require("qemu-img")
    if not cluster.local.running():  # a test that failed half-way left brokers down
        await asyncio.to_thread(cluster.local.start_nodes)
    trust_group = f"tg-{uuid.uuid4().hex[:8]}"
    routes = [(n.routed_advertised_port or 0, n.routed_port or 0) for n in cluster.state.nodes]
    common = {
        "trust_group": trust_group,
        "replication_factor": 3,
        "heartbeat_seconds": 1.0,
    }
    async with (
        KafkaLink(routes) as link,
        replicating_pair(
            short_dir,
            DISK_BYTES,
            {
                "site": "site-a",
                "root": short_dir / "a",
                "bootstrap_servers": cluster.routed_bootstrap_servers,
                **common,
            },
            {
                "site": "site-b",
                "root": short_dir / "b",
                "bootstrap_servers": cluster.bootstrap_servers,
                **common,
            },
            f"vm-{uuid.uuid4().hex[:6]}",
        ) as pair,
    ):
        writer = Writer(pair.uri, DISK_BYTES)
        writer.start()
        try:
            yield Run(cluster, link, pair, writer, trust_group)
        finally:
            link.restore()
            await writer.stop()


async def _describe(bootstrap: str, topic: str) -> tuple[int, list[int]]:
    """The leader and the in-sync replicas of the topic's partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        [partition] = described["partitions"]
        return int(partition["leader"]), sorted(partition["isr"])
    finally:
        await admin.close()


async def test_topics_have_three_replicas_and_two_must_acknowledge(run: Run) -> None:
    """What ``enable`` created on a three-broker cluster (``replication_factor = 3``)."""
    from vmreplica.journal.kafka import KafkaConnection, TopicAdmin  # noqa: PLC0415

    async with TopicAdmin(KafkaConnection(run.cluster.bootstrap_servers)) as admin:
        for topic in (run.journal, names.status_topic(run.pair.vm, run.trust_group)):
            configs = await admin.topic_configs(topic)
            assert configs["min.insync.replicas"] == "2", topic
            _, isr = await _describe(run.cluster.bootstrap_servers, topic)
            assert isr == [1, 2, 3], topic


async def test_a_broker_killed_and_restarted(run: Run) -> None:
    await run.replication_advances()
    leader, _ = await _describe(run.cluster.bootstrap_servers, run.journal)
    killed_at = time.monotonic()
    await asyncio.to_thread(run.cluster.local.stop_nodes, [leader], kill=True)
    # The partition's leadership moves once the controller notices (Kafka's broker session
    # timeout, 9 s): meanwhile nothing is acknowledged, which both sites' health says.
    await wait_for_health(
        run.pair.config_b,
        run.pair.vm,
        ("warning", "critical"),
        "no heartbeat from primary site",
        30,
    )
    await run.replication_advances()
    resumed_seconds = time.monotonic() - killed_at
    _, isr = await _describe(run.cluster.bootstrap_servers, run.journal)
    assert leader not in isr
    assert len(isr) == 2
    assert (await status_of(run.pair.config_a, run.pair.vm))["state"] == "replicating"
    await asyncio.to_thread(run.cluster.local.start_nodes)

    async def back_in_sync() -> bool:
        return (await _describe(run.cluster.bootstrap_servers, run.journal))[1] == [1, 2, 3]

    await wait_until(back_in_sync, "the restarted broker to be in sync again", 120)
    await run.replication_advances()
    await run.finish()
    print(f"\nbroker {leader} killed: replication resumed after {resumed_seconds:.1f} s")


async def test_every_broker_stopped_then_started(run: Run) -> None:
    await run.replication_advances()
    before = await run.pair.shipped()
    await asyncio.to_thread(run.cluster.local.stop_nodes)
    stopped_at = time.monotonic()
    critical = await wait_for_health(
        run.pair.config_a,
        run.pair.vm,
        ("critical",),
        "Kafka has not acknowledged",
        STALL_SECONDS + 30,
    )
    assert critical["state"] == "error"
    assert "writes wait in the change log" in critical["message"]
    await wait_for_health(  # the replica's site cannot reach Kafka either, and says so
        run.pair.config_b,
        run.pair.vm,
        ("warning", "critical"),
        "Kafka unreachable",
        30,
    )
    assert await run.pair.shipped() <= before + 1  # nothing can ship, the VM still writes
    written = run.writer.written
    await asyncio.sleep(max(0.0, ALL_STOPPED_SECONDS - (time.monotonic() - stopped_at)))
    assert run.writer.written > written
    assert run.writer.failures == []
    await asyncio.to_thread(run.cluster.local.start_nodes)
    started_at = time.monotonic()
    await run.replication_advances()
    resumed_seconds = time.monotonic() - started_at
    status = await status_of(run.pair.config_a, run.pair.vm)
    assert status["state"] == "replicating"
    assert status["message"].startswith("Kafka answered again after"), status["message"]
    await run.finish()
    print(f"\nall brokers stopped: replication resumed {resumed_seconds:.1f} s after restart")


async def test_primary_cut_off_from_kafka(run: Run) -> None:
    await run.replication_advances()
    run.link.cut()
    cut_at = time.monotonic()
    await wait_for_health(
        run.pair.config_b,
        run.pair.vm,
        ("warning", "critical"),
        "no heartbeat from primary site",
        30,
    )
    critical = await wait_for_health(
        run.pair.config_a,
        run.pair.vm,
        ("critical",),
        "Kafka has not acknowledged",
        STALL_SECONDS + 30,
    )
    assert "writes wait in the change log" in critical["message"]
    await asyncio.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    run.link.restore()
    restored_at = time.monotonic()
    await run.replication_advances()
    resumed_seconds = time.monotonic() - restored_at
    await run.finish()
    print(f"\nlink cut {CUT_SECONDS:.0f} s: replication resumed {resumed_seconds:.1f} s after")
