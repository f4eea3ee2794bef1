"""What Kafka lets this site's principal do with a VM's resources, asked without changing
anything (`vmreplica test-connection`).

A site's principal may not list ACL entries (``DescribeAcls`` needs a right on the cluster that
only the administrator has), so the broker is asked what it would allow instead:

- **topics**: a ``Metadata`` request (version 8) with ``include_topic_authorized_operations``
  returns, for each topic, the operations the calling principal is authorized for, as Kafka's
  authorizer decides them (a broker without an authorizer allows everything);
- **the transactional id**: ``FindCoordinator`` for it needs DESCRIBE on it, and is harmless.
  WRITE cannot be asked without initialising a producer, which would fence the VM's running
  primary; the ACLs `broker add-site` grants give DESCRIBE and WRITE together.

aiokafka knows neither request version, so both are spoken with its protocol types, as
:mod:`vmreplica.journal.access` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.coordination import FindCoordinatorRequest_v1
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from vmreplica.errors import BrokerError
from vmreplica.journal.kafka import KafkaConnection

_TRANSACTION_COORDINATOR = 1
_NO_OPERATIONS_ASKED = -(2**31)
"""Kafka's answer when authorized operations were not asked for (or not known)."""


class _MetadataResponseV8(Response):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(
                ("node_id", Int32),
                ("host", String("utf-8")),
                ("port", Int32),
                ("rack", String("utf-8")),
            ),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("name", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", Array(Int32)),
                        ("isr_nodes", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class _TopicOperations(Request[_MetadataRequestV8]):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY: ClassVar[int] = 3

    def __init__(self, topics: Sequence[str]) -> None:
        self._topics = list(topics)

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self._topics, False, False, True)


class _FindTransactionCoordinator(Request[FindCoordinatorRequest_v1]):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY: ClassVar[int] = 10

    def __init__(self, transactional_id: str) -> None:
        self._transactional_id = transactional_id

    def build(
        self, request_struct_class: type[FindCoordinatorRequest_v1]
    ) -> FindCoordinatorRequest_v1:
        return request_struct_class(self._transactional_id, _TRANSACTION_COORDINATOR)


@dataclass(frozen=True)
class TopicAccess:
    """What the broker says about one topic for this principal."""

    topic: str
    error: str | None
    """Kafka's error for the topic (``TopicAuthorizationFailedError``), or None."""
    operations: frozenset[int] | None
    """The ``AclOperation`` codes allowed (None: the broker did not say)."""


async def topic_access(connection: KafkaConnection, topics: Sequence[str]) -> list[TopicAccess]:
    """What this site's principal may do with each of ``topics``.

    :raises BrokerError: Kafka did not answer.
    """
    admin = AIOKafkaAdminClient(**connection.options())
    try:
        await admin.start()
        response: Any = await admin._send_request(_TopicOperations(topics))
    except (KafkaError, OSError) as error:
        raise BrokerError(f"asking Kafka which operations this site may do: {error}") from error
    finally:
        await admin.close()
    found = []
    for code, name, _, _, authorized in response.topics:
        operations = (
            None
            if authorized == _NO_OPERATIONS_ASKED
            else frozenset(bit for bit in range(32) if authorized & (1 << bit))
        )
        found.append(TopicAccess(name, for_code(code).__name__ if code else None, operations))
    return found


async def transactional_id_error(connection: KafkaConnection, transactional_id: str) -> str | None:
    """None when this site may DESCRIBE ``transactional_id``, else Kafka's error name.

    :raises BrokerError: Kafka did not answer.
    """
    admin = AIOKafkaAdminClient(**connection.options())
    try:
        await admin.start()
        response: Any = await admin._send_request(_FindTransactionCoordinator(transactional_id))
    except (KafkaError, OSError) as error:
        raise BrokerError(
            f"asking Kafka about transactional id {transactional_id}: {error}"
        ) from error
    finally:
        await admin.close()
    return for_code(response.error_code).__name__ if response.error_code else None
