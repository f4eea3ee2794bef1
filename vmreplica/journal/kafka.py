"""The one module that speaks to Kafka: topics, transactional publishing, committed reads.

Everything else in vmreplica works with :class:`KafkaConnection`, :class:`JournalPublisher` and
:class:`JournalReader` and sees only vmreplica errors: aiokafka's exceptions are translated here
(the way karapace keeps its Kafka error mapping in one place).

About 580 lines, on purpose: it is the only module that imports aiokafka, so every client and
every translation of its errors is here; the security settings are
:mod:`~vmreplica.journal.credentials` and the admin requests aiokafka lacks
:mod:`~vmreplica.journal.access`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    NodeNotReadyError,
    OffsetOutOfRangeError,
    ProducerFenced,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from vmreplica.errors import (
    AccessDenied,
    BrokerError,
    BrokerUnreachable,
    FencedError,
    JournalTruncated,
)
from vmreplica.journal.allocator import tune_allocator
from vmreplica.journal.credentials import ClientSecurity
from vmreplica.journal.pace import Pace
from vmreplica.schemas.codec import encode
from vmreplica.schemas.events import JournalEvent
from vmreplica.schemas.payload import PayloadCipher
from vmreplica.service import Service

T = TypeVar("T")
_client_log = logging.getLogger("vmreplica.journal.kafka")

TOPIC_PROPAGATION_SECONDS: Final = 10.0
"""How long a topic just created may stay unknown to the broker that is asked about it."""
DEAD_BROKER_SECONDS: Final = 10.0
"""How long an admin request goes on trying other brokers when the one it picked cannot be
reached: about a broker's session timeout (9 s), after which the metadata no longer lists it."""
_UNKNOWN_TOPIC_OR_PARTITION: Final = 3
"""Kafka's error code for a topic this broker does not know (yet)."""
_AUTHORIZATION_CODES: Final = {
    TopicAuthorizationFailedError.errno: "the topic",
    GroupAuthorizationFailedError.errno: "the consumer group",
    ClusterAuthorizationFailedError.errno: "the cluster",
    TransactionalIdAuthorizationFailed.errno: "the transactional id",
}
"""Kafka's error codes for an ACL refusal, and what was refused."""
MAX_RECORD_BYTES: Final = 8 * 1024 * 1024
"""Producer request and topic ``max.message.bytes``: a write batch is packed to stay below it."""
REQUEST_TIMEOUT_MS: Final = 30_000
TRANSACTION_TIMEOUT_MS: Final = 60_000
"""Long enough for a 15-minute cycle's worth of batches to be sent on a slow link."""
STALL_SECONDS: Final = 20.0
"""A transaction that makes no progress this long (no record acknowledged, no commit) fails
with :class:`BrokerError`, well before the broker's ``transaction.timeout.ms`` would abort it and
fence the producer. aiokafka itself retries for ever while the brokers, or the link to them, are
away; the caller restarts the publisher (:meth:`JournalPublisher.restart`) and tries again."""
SENDER_YIELDS: Final = 4
"""Event-loop turns given to aiokafka's sender after each record is queued: enough for it to
wake, drain the batch and write the request, so the broker stores record N while record N+1 is
built (``send`` itself never yields while the buffer has room)."""
FETCH_MAX_BYTES: Final = 2 * MAX_RECORD_BYTES
"""What one fetch returns at most: two of the largest records, and below the allocator's mmap
threshold (see :func:`~vmreplica.journal.allocator.tune_allocator`)."""
READ_TO_END_FETCH_SECONDS: Final = 0.05
"""How long :func:`read_to_end` lets one fetch wait. A topic written in transactions ends with a
commit marker, which a fetch consumes without returning a record: a longer wait there is pure
delay (a whole second per read, each failover step reads the journal), not fewer requests."""


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach the cluster and who to be there: every client of this module is built
    from :meth:`options`, so a secured site's producers, consumers and admin clients all use
    its TLS and SASL settings."""

    bootstrap_servers: str
    client_id: str = "vmreplica"
    extra: Mapping[str, Any] = field(default_factory=dict)
    security: ClientSecurity = field(default_factory=ClientSecurity)

    def options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": REQUEST_TIMEOUT_MS,
            **self.security.options(),
            **self.extra,
        }


def _refused(what: str, doing: str) -> AccessDenied:
    return AccessDenied(
        f"{doing}: Kafka's ACLs refuse this site access to {what}. Operator action: grant the "
        "site's principal its trust group (`vmreplica broker add-site SITE --trust-group G`), "
        "or check `sasl_username` and `trust_group` in the site configuration"
    )


def quiet_client_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log in one line, without a traceback, the aiokafka errors nobody awaited.

    aiokafka leaves some of its internal futures' exceptions unretrieved — a fenced producer's
    pending partition registration, a connection to a broker that went away, a producer this
    module abandoned because its brokers did not answer — and asyncio prints each one with a
    traceback when it is garbage-collected. Their failures were already reported through the
    calls that awaited them (as :class:`BrokerError`); anything else goes to the loop's usual
    handler.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, KafkaError):
            _client_log.warning("%s: %s: %s", context.get("message"), type(error).__name__, error)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("aiokafka")]:
        logging.getLogger(name).addFilter(_one_line)


def _one_line(record: logging.LogRecord) -> bool:
    """aiokafka's own log records of a Kafka error, in one line: it logs some with their
    traceback (its producer's sender when a broker closes the connection in a commit), which
    tells an operator nothing the call that failed does not report as a :class:`BrokerError`."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, KafkaError):
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
        record.args = None
        record.exc_info = record.exc_text = None
    return True


def _translate(error: BaseException, doing: str) -> BrokerError:
    code = getattr(error, "errno", None)
    if isinstance(error, KafkaError) and code in _AUTHORIZATION_CODES:
        return _refused(_AUTHORIZATION_CODES[code], doing)
    if isinstance(error, ProducerFenced | InvalidProducerEpoch):
        return FencedError(
            f"{doing}: another producer with the same transactional id has taken over "
            "(a newer primary for this VM). This site must stop publishing for it."
        )
    if isinstance(
        error,
        KafkaConnectionError
        | KafkaTimeoutError
        | NoBrokersAvailable
        | NodeNotReadyError
        | RequestTimedOutError
        | TimeoutError
        | OSError,
    ):
        return BrokerUnreachable(
            f"{doing}: cannot reach Kafka ({error}). Check that the brokers "
            "are up (`vmreplica broker status`) and the bootstrap servers."
        )
    return BrokerError(f"{doing}: {type(error).__name__}: {error}")


async def _count_brokers(connection: KafkaConnection) -> int:
    admin = AIOKafkaAdminClient(**{**connection.options(), "request_timeout_ms": 5000})
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return len(cluster["brokers"])
    except (TimeoutError, KafkaError, OSError) as error:
        raise _translate(error, "describing the cluster") from error
    finally:
        await admin.close()


def count_brokers(connection: KafkaConnection) -> int:
    """How many brokers the cluster reports (synchronous; for start-up checks)."""
    return asyncio.run(_count_brokers(connection))


@dataclass(frozen=True)
class TopicSpec:
    """A topic as vmreplica creates it: one partition, explicit configs."""

    name: str
    replication_factor: int
    configs: Mapping[str, str]


class TopicAdmin(Service):
    """Creates and inspects vmreplica's topics."""

    def __init__(self, connection: KafkaConnection) -> None:
        self._admin = AIOKafkaAdminClient(**connection.options())

    async def start(self) -> None:
        try:
            await self._admin.start()
        except (KafkaError, OSError) as error:
            raise _translate(error, "connecting the admin client") from error

    async def stop(self) -> None:
        await self._admin.close()

    async def ensure_topic(self, spec: TopicSpec) -> bool:
        """Create the topic unless it exists; True when this call created it."""
        topic = NewTopic(
            spec.name,
            num_partitions=1,
            replication_factor=spec.replication_factor,
            topic_configs=dict(spec.configs),
        )
        try:
            response = await self._admin.create_topics([topic])
        except TopicAlreadyExistsError:
            return False
        except KafkaError as error:
            raise _translate(error, f"creating topic {spec.name}") from error
        for name, code, *rest in response.topic_errors:
            if code == TopicAlreadyExistsError.errno:
                return False
            if code in _AUTHORIZATION_CODES:
                raise _refused(_AUTHORIZATION_CODES[code], f"creating topic {name}")
            if code != 0:
                message = rest[0] if rest else ""
                raise BrokerError(f"creating topic {name} failed with error code {code}: {message}")
        return True

    async def topic_configs(self, name: str) -> dict[str, str]:
        """The topic's effective configuration, as the broker reports it.

        A broker of a cluster learns of a topic just created a moment after the controller: an
        unknown topic is asked again for up to :data:`TOPIC_PROPAGATION_SECONDS`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOPIC_PROPAGATION_SECONDS
        while True:
            try:
                responses = await self._admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, name)]
                )
            except KafkaError as error:
                raise _translate(error, f"describing topic {name}") from error
            configs: dict[str, str] = {}
            unknown = False
            for response in responses:
                for resource in response.resources:
                    error_code, error_message = resource[0], resource[1]
                    if error_code == _UNKNOWN_TOPIC_OR_PARTITION and loop.time() < deadline:
                        unknown = True
                    elif error_code in _AUTHORIZATION_CODES:
                        raise _refused(_AUTHORIZATION_CODES[error_code], f"describing {name}")
                    elif error_code != 0:
                        raise BrokerError(
                            f"describing topic {name}: error code {error_code} "
                            f"{error_message or '(no message)'}"
                        )
                    for entry in resource[4]:
                        configs[entry[0]] = entry[1]
            if not unknown:
                return configs
            await asyncio.sleep(0.1)

    async def topics(self) -> list[str]:
        """Every topic's name. The admin client asks one broker at random, and a broker that
        just died stays in the cluster's metadata for its session timeout (a stretched
        cluster that lost a site): one that cannot be reached is passed over for another, for
        up to :data:`DEAD_BROKER_SECONDS`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEAD_BROKER_SECONDS
        while True:
            try:
                return list(await self._admin.list_topics())
            except (NodeNotReadyError, KafkaConnectionError) as error:
                if loop.time() > deadline:
                    raise _translate(error, "listing topics") from error
                await asyncio.sleep(0.2)
            except KafkaError as error:
                raise _translate(error, "listing topics") from error


class JournalPublisher(Service):
    """A transactional producer for one VM: each cycle is published as one transaction.

    Every site uses the same ``transactional_id`` for a VM, so initialising a producer at a new
    primary fences the old one at the broker. ``encode`` turns the site's events into records:
    a site passes its signing key's (:meth:`vmreplica.security.signing.SiteKey.encode`); the
    default writes them unsigned (tools and tests that play a forger).
    """

    def __init__(
        self,
        connection: KafkaConnection,
        transactional_id: str,
        encode: Callable[[JournalEvent], bytes] = encode,
        cipher: PayloadCipher | None = None,
        pace: Pace | None = None,
    ) -> None:
        """``pace``: the VM's bandwidth limit (:mod:`vmreplica.journal.pace`), or None."""
        tune_allocator()
        self.transactional_id = transactional_id
        self.pace = pace
        self.encode = encode
        """How this publisher's site encodes (and signs) a journal event."""
        self.cipher = cipher
        """Encrypts the VM's payloads, when its replication is encrypted."""
        self._connection = connection
        self._producer = self._new_producer()
        self._started = False
        self._one_transaction_at_a_time = asyncio.Lock()
        """Heartbeats and cycles share the producer; Kafka allows one open transaction."""

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._connection.options(),
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            max_request_size=MAX_RECORD_BYTES,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            linger_ms=0,
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except (KafkaError, OSError) as error:
            await self._producer.stop()
            raise _translate(error, f"starting producer {self.transactional_id}") from error
        self._started = True

    async def stop(self) -> None:
        """Close the producer; one whose brokers do not answer is abandoned after
        :data:`STALL_SECONDS` (its unsent records were never acknowledged, so never counted)."""
        if self._started:
            self._started = False
            try:
                async with asyncio.timeout(STALL_SECONDS):
                    await self._producer.stop()
            except (TimeoutError, KafkaError, OSError):
                pass

    async def restart(self) -> None:
        """A new producer with the same ``transactional_id``, after a failed publish: its
        initialisation makes the broker finish the transaction the old one left open —
        committing it if its commit had been written, aborting it otherwise — so the journal
        then says which it was (the caller reconciles with it).

        :raises BrokerError: the brokers still do not answer (within :data:`STALL_SECONDS`).
        """
        async with self._one_transaction_at_a_time:
            await self.stop()
            self._producer = self._new_producer()
            try:
                async with asyncio.timeout(STALL_SECONDS):
                    await self.start()
            except TimeoutError:
                await self.stop()
                raise BrokerUnreachable(
                    f"starting producer {self.transactional_id}: Kafka did not answer within "
                    f"{STALL_SECONDS:.0f} s. Check that the brokers are up and reachable."
                ) from None

    async def publish(
        self,
        topic: str,
        key: bytes,
        values: Iterable[bytes],
        *,
        build_in_thread: bool = False,
        paced: bool = True,
    ) -> list[int]:
        """Publish ``values`` in order as one transaction and return their offsets.

        ``values`` may be a generator: records are sent as they are produced, so a large cycle
        never sits in memory whole. With ``build_in_thread`` each next value is produced in a
        worker thread while the one before is sent (a cycle's records: reading, checksumming,
        compressing and signing release the GIL), so the event loop goes on serving the VM's
        writes and the Kafka sender meanwhile; the generator then must not touch state the
        event loop changes. With a bandwidth limit, a ``paced`` transaction (data: a cycle,
        seed chunks) first waits until what was sent fits the limit; control records
        (``paced=False``: heartbeats, epochs) never wait.

        The transaction is committed before this returns; on any failure it is aborted (when the
        broker still lets us) and nothing of it becomes visible to ``read_committed`` readers.

        :raises FencedError: a newer producer for this VM exists.
        :raises BrokerError: the broker failed the transaction.
        """
        if paced and self.pace is not None:
            await self.pace.wait()
        produced = _built_ahead(values) if build_in_thread else _at_once(values)
        async with self._one_transaction_at_a_time, contextlib.aclosing(produced):
            return await self._transaction(topic, key, produced)

    async def _transaction(self, topic: str, key: bytes, values: AsyncIterator[bytes]) -> list[int]:
        producer = self._producer
        size = 0
        try:
            await producer.begin_transaction()
            try:
                futures = []
                async for value in values:
                    size += len(value)
                    sent = producer.send(topic, value=value, key=key, partition=0)
                    futures.append(await _progress(sent, topic))
                    for _ in range(SENDER_YIELDS):  # let the sender start on it
                        await asyncio.sleep(0)
                metadata = await _progress(asyncio.gather(*futures), topic)
                await _progress(producer.commit_transaction(), topic)
                if self.pace is not None:
                    self.pace.spent(size)
            except BaseException as error:
                # A fenced producer is in a fatal state and cannot abort; the broker aborts its
                # open transaction when the new producer initialises.
                if not isinstance(error, ProducerFenced | InvalidProducerEpoch | BrokerError):
                    with contextlib.suppress(KafkaError, AssertionError, TimeoutError):
                        async with asyncio.timeout(STALL_SECONDS):
                            await producer.abort_transaction()
                raise
        except KafkaError as error:
            raise _translate(error, f"publishing a transaction to {topic}") from error
        return [record.offset for record in metadata]


async def _at_once(values: Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    for value in values:
        yield value


async def _built_ahead(values: Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    """``values``, each produced in a worker thread while the caller sends the one before."""
    iterator = iter(values)
    ahead = asyncio.ensure_future(asyncio.to_thread(next, iterator, None))
    try:
        while (value := await ahead) is not None:
            ahead = asyncio.ensure_future(asyncio.to_thread(next, iterator, None))
            yield value
    finally:
        # The transaction failed meanwhile: let the thread finish with the generator first
        # (a retry builds the same records with the same compressor), and read its outcome.
        with contextlib.suppress(Exception):
            await asyncio.shield(ahead)


async def _progress(step: Awaitable[T], topic: str) -> T:
    """One step of a transaction, which must end within :data:`STALL_SECONDS`.

    :raises BrokerError: it did not; the transaction's outcome is unknown until the publisher
        is restarted (:meth:`JournalPublisher.restart`).
    """
    try:
        async with asyncio.timeout(STALL_SECONDS):
            return await step
    except TimeoutError:
        raise BrokerUnreachable(
            f"publishing a transaction to {topic}: Kafka acknowledged nothing for "
            f"{STALL_SECONDS:.0f} s. Check that the brokers are up and this site reaches them."
        ) from None


@dataclass(frozen=True)
class JournalRecord:
    """A committed record read from a journal or status topic."""

    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


class JournalReader(Service):
    """Reads one single-partition topic from a given offset, committed records only.

    Positions are kept by the caller (the replica's catalog), not in Kafka consumer groups, so
    that the applied position and the image are recorded together.
    """

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        max_fetch_bytes: int = FETCH_MAX_BYTES,
        *,
        past_retention: Literal["earliest", "raise"] = "earliest",
    ) -> None:
        """``past_retention``: what a fetch does when the next offset was deleted by the
        topic's retention — go on from the earliest record left, or raise
        :class:`~vmreplica.errors.JournalTruncated` (a replica, which must not skip cycles)."""
        tune_allocator()
        self.topic = topic
        self._partition = TopicPartition(topic, 0)
        self._consumer = AIOKafkaConsumer(
            **connection.options(),
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest" if past_retention == "earliest" else "none",
            max_partition_fetch_bytes=max_fetch_bytes,
            fetch_max_bytes=max_fetch_bytes,
            group_id=None,
        )
        self._started = False
        self._check_access = connection.security.protocol != "PLAINTEXT"
        """Whether the broker may have ACLs: aiokafka's consumer only logs a topic it may not
        read and returns nothing for ever, so the reader asks the metadata itself."""

    def _refuse_unauthorized(self) -> None:
        if self.topic in self._consumer._client.cluster.unauthorized_topics:
            raise _refused("the topic", f"reading {self.topic}")

    async def start(self, offset: int | None = None) -> None:
        """Connect and position at ``offset`` (the next record to read), or the beginning.

        :raises AccessDenied: the ACLs do not let this site read the topic.
        """
        try:
            await self._consumer.start()
            self._consumer.assign([self._partition])
            if self._check_access:
                await self._consumer._client.force_metadata_update()
                self._refuse_unauthorized()
            if offset is None:
                await self._consumer.seek_to_beginning(self._partition)
            else:
                self._consumer.seek(self._partition, offset)
        except AccessDenied:
            await self._consumer.stop()
            raise
        except (KafkaError, OSError) as error:
            await self._consumer.stop()
            raise _translate(error, f"reading {self.topic}") from error
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    def seek(self, offset: int) -> None:
        self._consumer.seek(self._partition, offset)

    async def fetch(
        self,
        timeout_seconds: float = 1.0,
        max_records: int | None = None,
    ) -> list[JournalRecord]:
        """The next committed records, possibly none when ``timeout_seconds`` passes.

        :raises JournalTruncated: (``past_retention="raise"``) the next record was deleted.
        """
        try:
            batches = await self._consumer.getmany(
                self._partition, timeout_ms=int(timeout_seconds * 1000), max_records=max_records
            )
        except OffsetOutOfRangeError as error:
            wanted = int(error.args[0][self._partition]) if error.args else -1
            raise JournalTruncated(self.topic, wanted, await self.beginning_offset()) from error
        except KafkaError as error:
            raise _translate(error, f"reading {self.topic}") from error
        if not batches and self._check_access:
            self._refuse_unauthorized()  # access withdrawn while reading
        return [
            JournalRecord(m.offset, m.key, m.value, m.timestamp)
            for m in batches.get(self._partition, [])
        ]

    async def position(self) -> int:
        """The offset of the next record this reader will return (past transaction markers)."""
        try:
            return int(await self._consumer.position(self._partition))
        except KafkaError as error:
            raise _translate(error, f"reading {self.topic}") from error

    async def beginning_offset(self) -> int:
        """The offset of the oldest record the topic still holds (retention deletes older ones)."""
        try:
            offsets = await self._consumer.beginning_offsets([self._partition])
        except KafkaError as error:
            raise _translate(error, f"reading the start of {self.topic}") from error
        return int(offsets[self._partition])

    async def end_offset(self) -> int:
        """The last stable offset: where a read_committed reader that is caught up stands."""
        try:
            offsets = await self._consumer.end_offsets([self._partition])
        except KafkaError as error:
            raise _translate(error, f"reading the end of {self.topic}") from error
        return int(offsets[self._partition])


async def read_to_end(
    connection: KafkaConnection,
    topic: str,
    start: int = 0,
    *,
    last: int | None = None,
    past_end_reads_all: bool = False,
) -> AsyncGenerator[JournalRecord, None]:
    """Committed records of ``topic`` from offset ``start`` (or only the ``last`` offsets) up
    to its end as of this call. Callers that may stop early wrap it in
    ``contextlib.aclosing`` so the reader is closed at once.

    ``past_end_reads_all``: a ``start`` past the topic's end was recorded in another copy of
    it (another cluster's, or before the topic was recreated): read it all instead of nothing.
    """
    async with JournalReader(connection, topic) as reader:
        end = await reader.end_offset()
        if last is not None:
            start = max(0, end - last)
        elif past_end_reads_all and start > end:
            start = 0
        reader.seek(start)
        # Transaction markers take offsets but are never returned: progress is the position.
        while await reader.position() < end:
            for record in await reader.fetch(READ_TO_END_FETCH_SECONDS):
                if record.offset >= end:
                    return
                yield record


class StatusPublisher:
    """A plain (non-transactional, idempotent) producer for status and heartbeat records.

    Shared by the replica VMs of a site: :meth:`start` connects it once (again after a failed
    start: a site may come up while Kafka is down); until then :meth:`publish` refuses.
    """

    def __init__(self, connection: KafkaConnection) -> None:
        self._connection = connection
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        """Connect, unless connected. :raises BrokerError: no broker answered."""
        async with self._starting:
            if self._producer is not None:
                return
            producer = AIOKafkaProducer(
                **self._connection.options(),
                acks="all",
                enable_idempotence=True,
                # A DigestMap of a 16 GiB disk is 4 MiB (the status topic takes it); aiokafka's
                # default of 1 MiB refused the digests of any disk from 4 GiB up.
                max_request_size=MAX_RECORD_BYTES,
            )
            try:
                await producer.start()
            except (KafkaError, OSError) as error:
                await producer.stop()
                raise _translate(error, "starting the status producer") from error
            self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def publish(self, topic: str, key: bytes, value: bytes) -> int:
        """Publish one record; :raises BrokerError: not acknowledged (within
        :data:`STALL_SECONDS`: the brokers or the link to them are away)."""
        if self._producer is None:
            raise BrokerUnreachable(f"publishing to {topic}: the status producer is not connected")
        sent = self._producer.send_and_wait(topic, value=value, key=key, partition=0)
        try:
            metadata = await _progress(sent, topic)
        except KafkaError as error:
            raise _translate(error, f"publishing to {topic}") from error
        return int(metadata.offset)
