"""What the design relies on from Kafka, proved against a real broker.

A per-VM topic is created with explicit configs; a cycle published as one transaction is seen
all-or-nothing by a ``read_committed`` reader; an aborted one is never seen; and a second producer
with the same transactional id fences the first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from aiokafka import AIOKafkaProducer

from vmreplica.domain.names import journal_topic
from vmreplica.errors import ChangeLogCorrupt, FencedError
from vmreplica.journal.kafka import JournalPublisher, JournalReader, KafkaConnection, TopicAdmin
from vmreplica.journal.topics import journal_spec

pytestmark = pytest.mark.integration


async def read_all(kafka: KafkaConnection, topic: str, *, expect: int) -> list[bytes]:
    """Every committed value on ``topic``, waiting until ``expect`` arrived or the log ends."""
    values: list[bytes] = []
    async with JournalReader(kafka, topic) as reader:
        end = await reader.end_offset()
        for _ in range(20):
            values += [record.value for record in await reader.fetch(0.5)]
            if len(values) >= expect and (not values or await reader.end_offset() <= end):
                break
    return values


async def test_journal_topic_is_created_with_explicit_configs(
    topic_admin: TopicAdmin, unique: Callable[[str], str]
) -> None:
    name = journal_topic(unique("vm"))
    spec = journal_spec(name, replication_factor=1, retention_hours=48)

    assert await topic_admin.ensure_topic(spec) is True
    assert await topic_admin.ensure_topic(spec) is False  # idempotent

    configs = await topic_admin.topic_configs(name)
    for key in ("retention.ms", "max.message.bytes", "min.insync.replicas", "cleanup.policy"):
        assert configs[key] == spec.configs[key], key
    assert configs["retention.ms"] == str(48 * 3_600_000)


async def test_committed_transaction_is_seen_whole_and_open_one_not_at_all(
    kafka: KafkaConnection, topic_admin: TopicAdmin, unique: Callable[[str], str]
) -> None:
    topic = journal_topic(unique("vm"))
    await topic_admin.ensure_topic(journal_spec(topic, 1))
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        transactional_id=unique("txn"),
        enable_idempotence=True,
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in range(5):
            await producer.send_and_wait(topic, f"batch-{i}".encode(), partition=0)
        # Sent and acknowledged, but not committed: a read_committed reader sees nothing.
        async with JournalReader(kafka, topic) as reader:
            assert await reader.fetch(1.0) == []
        await producer.commit_transaction()
    finally:
        await producer.stop()

    assert await read_all(kafka, topic, expect=5) == [f"batch-{i}".encode() for i in range(5)]


async def test_aborted_transaction_is_never_seen(
    kafka: KafkaConnection, topic_admin: TopicAdmin, unique: Callable[[str], str]
) -> None:
    topic = journal_topic(unique("vm"))
    await topic_admin.ensure_topic(journal_spec(topic, 1))
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        transactional_id=unique("txn"),
        enable_idempotence=True,
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in range(3):
            await producer.send_and_wait(topic, f"aborted-{i}".encode(), partition=0)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    async with JournalPublisher(kafka, unique("txn2")) as publisher:
        offsets = await publisher.publish(topic, b"vm", [b"kept-0", b"kept-1", b"commit"])

    assert offsets == sorted(offsets)
    assert len(offsets) == 3
    assert await read_all(kafka, topic, expect=3) == [b"kept-0", b"kept-1", b"commit"]


async def test_second_producer_with_same_transactional_id_fences_the_first(
    kafka: KafkaConnection, topic_admin: TopicAdmin, unique: Callable[[str], str]
) -> None:
    topic = journal_topic(unique("vm"))
    await topic_admin.ensure_topic(journal_spec(topic, 1))
    shared_id = unique("vm-primary")

    old_primary = JournalPublisher(kafka, shared_id)
    await old_primary.start()
    try:
        await old_primary.publish(topic, b"vm", [b"old-1"])
        async with JournalPublisher(kafka, shared_id) as new_primary:
            with pytest.raises(FencedError, match="same transactional id has taken over"):
                await old_primary.publish(topic, b"vm", [b"zombie"])
            await new_primary.publish(topic, b"vm", [b"new-1"])
    finally:
        await old_primary.stop()

    assert await read_all(kafka, topic, expect=2) == [b"old-1", b"new-1"]


async def test_records_built_in_a_thread_arrive_in_order_and_a_failing_build_aborts(
    kafka: KafkaConnection, topic_admin: TopicAdmin, unique: Callable[[str], str]
) -> None:
    """``build_in_thread``: each record is made in a worker thread while the one before is
    sent; an error while making one aborts the whole transaction, and the publisher goes on."""
    topic = journal_topic(unique("vm"))
    await topic_admin.ensure_topic(journal_spec(topic, 1))
    made_in: set[int] = set()

    def cycle(name: str, count: int, fail_at: int | None = None) -> Iterator[bytes]:
        for i in range(count):
            if i == fail_at:
                raise ChangeLogCorrupt(f"record {i} of {name} is damaged")
            made_in.add(threading.get_ident())
            yield f"{name}-{i}".encode()

    async with JournalPublisher(kafka, unique("txn")) as publisher:
        with pytest.raises(ChangeLogCorrupt, match="record 2 of broken"):
            await publisher.publish(topic, b"vm", cycle("broken", 4, 2), build_in_thread=True)
        offsets = await publisher.publish(topic, b"vm", cycle("whole", 5), build_in_thread=True)

    assert threading.get_ident() not in made_in
    assert offsets == sorted(offsets)
    assert len(offsets) == 5
    assert await read_all(kafka, topic, expect=5) == [f"whole-{i}".encode() for i in range(5)]
