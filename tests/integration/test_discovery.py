"""Discovery that never expires, against the real broker.

A third replica site, started only after the VM shipped many cycles and after the journal's
retention deleted the seed (Kafka's DeleteRecords moves the log start offset exactly as
retention does), finds the VM on the trust group's compacted configs topic, asks for a seed by
block compare, is seeded by the primary's agent on its own (its resync worker), and ends equal to
the primary, while the first replica follows on undisturbed.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from tests.fixtures import SitePair, VmFactory
from vmreplica.consumers.replica import ReplicaVm
from vmreplica.domain.model import VmSettings
from vmreplica.domain.states import ReplicationState
from vmreplica.failover.resync_job import load_job
from vmreplica.journal.kafka import JournalPublisher, JournalReader
from vmreplica.runtime.resync_worker import ResyncWorker
from vmreplica.runtime.site import Site
from vmreplica.schemas.codec import encode
from vmreplica.security.authorization import AuthorizationEntry
from vmreplica.security.signing import load_site_key
from vmreplica.storage.image import sha256_of

pytestmark = pytest.mark.integration

KiB: Final = 1024
MiB: Final = 1024 * KiB
DISKS: Final = {"disk0": 8 * MiB, "disk1": 4 * MiB}
CYCLES: Final = 12


async def delete_journal_before(site: Site, vm: str, offset: int) -> int:
    """What retention does to the journal's oldest segments; returns the new log start."""
    topic = site.journal_topic(vm)
    admin = AIOKafkaAdminClient(**site.connection.options())
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(offset)})
    finally:
        await admin.close()
    async with JournalReader(site.connection, topic) as reader:
        return await reader.beginning_offset()


async def apply_until(replica: ReplicaVm, done: asyncio.Event) -> None:
    while not done.is_set():
        await replica.step(0.1)


def digests(images: dict[str, Path]) -> dict[str, str]:
    return {name: sha256_of(path) for name, path in images.items()}


async def test_a_site_added_after_the_retention_passed_discovers_and_seeds_the_vm(
    site_pair: SitePair, vm: VmFactory
) -> None:
    settings = VmSettings(frequency_seconds=30, recovery_history=2, also_replicate_to=("site-c",))
    enabled = await vm(site_pair.a, DISKS, settings)
    rng = random.Random(5)
    async with site_pair.a.primary(enabled.record) as primary:
        for disk, size in DISKS.items():
            for offset in range(0, size, 512 * KiB):
                await primary.capture.write(disk, offset, rng.randbytes(64 * KiB))
        await primary.initial_replication()
        for _ in range(CYCLES):
            for _ in range(4):
                disk = rng.choice(list(DISKS))
                offset = rng.randrange(0, DISKS[disk] - 16 * KiB, 4 * KiB)
                await primary.capture.write(disk, offset, rng.randbytes(16 * KiB))
            await primary.replicate()
        [record_b] = await site_pair.b.discover()
        async with await site_pair.b.replica(record_b) as replica_b:
            await replica_b.catch_up()
            position = await site_pair.a.catalog.position(enabled.name)
            assert position is not None
            assert position.cycle >= CYCLES

            # The seed, its VmConfig and the first cycles are gone, as after the retention.
            start = await delete_journal_before(site_pair.a, enabled.name, position.next_offset - 1)
            assert start > 0

            c = await site_pair.sites.start("site-c")
            [record_c] = await c.discover()
            assert (record_c.name, record_c.role, record_c.partner_site) == (
                enabled.name,
                "replica",
                "site-a",
            )
            assert record_c.settings.frequency_seconds == 30
            assert record_c.settings.recovery_history == 2
            assert [(d.name, d.size_bytes) for d in record_c.disks] == list(DISKS.items())
            async with await c.replica(record_c) as replica_c:
                state = (await c.catalog.vm(enabled.name)).state
                assert state is ReplicationState.RESYNCHRONIZATION_REQUIRED
                assert (
                    "no longer holds its seed" in (await c.catalog.vm(enabled.name)).state_message
                )

                done = asyncio.Event()
                appliers = [
                    asyncio.create_task(apply_until(replica_c, done)),
                    asyncio.create_task(apply_until(replica_b, done)),
                ]
                worker = ResyncWorker(site_pair.a, primary)
                try:
                    # The primary's agent notices the new site and seeds it, unasked.
                    async with asyncio.timeout(120):
                        while (job := load_job(site_pair.a.config.vm_folder(enabled.name))) is None:
                            worker.next_watch = 0.0
                            await worker.watch()
                            await asyncio.sleep(0.2)
                        assert (job.target, job.automatic) == ("site-c", True)
                        worker.poll()
                        assert worker.task is not None
                        await worker.task
                finally:
                    done.set()
                    await asyncio.gather(*appliers)
                    await worker.stop()

                await primary.capture.write("disk1", 0, rng.randbytes(4 * KiB))
                last = (await primary.replicate())[-1].cycle
                assert await replica_c.catch_up() == last
                assert await replica_b.catch_up() == last
                finished = load_job(site_pair.a.config.vm_folder(enabled.name))
                assert finished is not None
                assert finished.phase == "done", finished
                print(
                    f"site-c seeded by block compare: {finished.examined_bytes} bytes examined, "
                    f"{finished.differing_bytes} differed, {finished.resent_bytes} resent, "
                    f"{finished.sent_bytes} bytes sent (disks: {sum(DISKS.values())} bytes)"
                )
                primary_digests = digests(enabled.disks)
                assert digests({n: i.path for n, i in replica_c.images.items()}) == primary_digests
                assert digests({n: i.path for n, i in replica_b.images.items()}) == primary_digests
                record = await c.catalog.vm(enabled.name)
                assert record.state is ReplicationState.REPLICATING, record.state_message
                assert (await site_pair.b.catalog.vm(enabled.name)).state is (
                    ReplicationState.REPLICATING
                )


async def test_discovery_takes_the_newest_configuration(site_pair: SitePair, vm: VmFactory) -> None:
    """The configs topic holds the VM's settings as they are now, not as the seed's VmConfig in
    the journal said: a setting changed since (what `vmreplica set` publishes) is what a site
    that discovers the VM later adopts."""
    enabled = await vm(site_pair.a, {"disk0": 1 * MiB}, VmSettings(frequency_seconds=30))
    async with site_pair.a.primary(enabled.record) as primary:
        await primary.initial_replication()
        primary.record = replace(
            primary.record, settings=replace(primary.record.settings, frequency_seconds=900)
        )
        await primary.publish_config()
    [record] = await site_pair.b.discover()
    assert record.settings.frequency_seconds == 900


async def test_a_forged_configuration_on_the_configs_topic_is_passed_over(
    site_pair: SitePair, vm: VmFactory
) -> None:
    """Site B trusts site A's key: a newer VmConfig of the VM that another key signed (an
    insider with the trust group's Kafka rights) is refused, and the VM is adopted as its
    primary described it."""
    a, b = site_pair.a, site_pair.b
    b.authorization.add(
        AuthorizationEntry(
            "site-a", b.config.trust_group, str(b.config.root / "r"), (a.key.public_text,)
        )
    )
    enabled = await vm(a, {"disk0": 1 * MiB}, VmSettings(frequency_seconds=30))
    async with a.primary(enabled.record) as primary:
        await primary.initial_replication()
        forged = replace(primary.config_event(), frequency_seconds=900)
    forger = load_site_key(a.config.root / "forger")
    async with JournalPublisher(a.connection, f"forger-{uuid.uuid4().hex}") as publisher:
        await publisher.publish(
            a.configs_topic, enabled.name.encode(), [forger.encode(forged), encode(forged)]
        )
    [record] = await b.discover()
    assert record.settings.frequency_seconds == 30
    assert "is not signed" in b.refused[b.configs_topic]
