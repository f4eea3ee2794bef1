"""Kafka's access control, through the admin API: SCRAM users and ACL entries.

aiokafka's admin client has no call for either (aiokafka issue 955), so the two requests are
spoken here with aiokafka's own protocol types: ``AlterUserScramCredentials`` (API 51, whose
only version is a flexible one) and ``CreateAcls``/``DescribeAcls``. Brokers forward both to
the KRaft controller; :func:`grant_site` then waits until every broker enforces the new entries
and accepts the new login, so a site configured right after it never sees a refusal.

Only a super user (the secured broker's ``admin``) may call these.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any, ClassVar, Final

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    DescribeAclsRequest_v1,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from vmreplica.errors import BrokerError, ConfigurationError
from vmreplica.journal.credentials import ClientSecurity, check_login
from vmreplica.journal.kafka import KafkaConnection
from vmreplica.security.grants import Grant, Operation, PatternType, ResourceType

SCRAM_ITERATIONS: Final = 8192
"""PBKDF2 rounds of a stored SCRAM credential (Kafka accepts 4096 to 16384)."""
SCRAM_MECHANISMS: Final = {"SCRAM-SHA-256": (1, "sha256"), "SCRAM-SHA-512": (2, "sha512")}
"""Kafka's ``ScramMechanism`` code and the hash of each mechanism."""
PROPAGATION_SECONDS: Final = 30.0
"""How long new credentials and ACL entries may take to reach every broker."""
_ALLOW: Final = 3
_ANY: Final = 1
_ANY_HOST: Final = "*"


class _AlterScramResponse(Response):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramStruct(RequestStruct):  # type: ignore[misc]  # aiokafka has no type information
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScram(Request[_AlterScramStruct]):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY: ClassVar[int] = 51

    def __init__(self, upsertion: tuple[str, int, int, bytes, bytes]) -> None:
        self._upsertion = upsertion

    def build(self, request_struct_class: type[_AlterScramStruct]) -> _AlterScramStruct:
        return request_struct_class([], [(*self._upsertion, {})], {})


class _CreateAcls(Request[CreateAclsRequest_v1]):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY: ClassVar[int] = 30

    def __init__(self, creations: list[tuple[int, str, int, str, str, int, int]]) -> None:
        self._creations = creations

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(self._creations)


class _DescribeAcls(Request[DescribeAclsRequest_v1]):  # type: ignore[misc]  # aiokafka has no type information
    API_KEY: ClassVar[int] = 29

    def __init__(self, principal: str) -> None:
        self._principal = principal

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> DescribeAclsRequest_v1:
        return request_struct_class(_ANY, None, _ANY, self._principal, None, _ANY, _ANY)


def salted_password(password: str, salt: bytes, mechanism: str, iterations: int) -> bytes:
    """SCRAM's ``SaltedPassword := Hi(password, salt, i)`` (RFC 5802), as Kafka stores it."""
    _, digest = SCRAM_MECHANISMS[mechanism]
    return hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)


def _check(errors: Sequence[tuple[int, str | None]], doing: str) -> None:
    for code, message in errors:
        if code != 0:
            raise BrokerError(f"{doing}: {for_code(code).__name__}: {message or '(no message)'}")


def principal_of(user: str) -> str:
    """The principal Kafka gives a SCRAM user."""
    return f"User:{user}"


async def upsert_scram_user(
    admin: AIOKafkaAdminClient, user: str, password: str, mechanism: str = "SCRAM-SHA-512"
) -> None:
    """Create ``user`` (or change its password) with a fresh salt."""
    code, _ = SCRAM_MECHANISMS[mechanism]
    salt = secrets.token_bytes(32)
    hashed = salted_password(password, salt, mechanism, SCRAM_ITERATIONS)
    request = _AlterScram((user, code, SCRAM_ITERATIONS, salt, hashed))
    response: Any = await admin._send_request(request)
    _check(
        [(code, message) for _, code, message, _ in response.results],
        f"creating Kafka user {user!r}",
    )


async def create_acls(admin: AIOKafkaAdminClient, principal: str, grants: Sequence[Grant]) -> None:
    """Add ALLOW entries for ``principal`` (entries it already has are kept once)."""
    creations = [
        (
            int(grant.resource_type),
            grant.resource_name,
            int(grant.pattern_type),
            principal,
            _ANY_HOST,
            int(grant.operation),
            _ALLOW,
        )
        for grant in grants
    ]
    response: Any = await admin._send_request(_CreateAcls(creations))
    _check(
        [(code, message) for code, message in response.creation_responses],
        f"granting {principal} its ACL entries",
    )


async def acls_of(admin: AIOKafkaAdminClient, principal: str, node_id: int) -> set[Grant]:
    """The ALLOW entries of ``principal`` that broker ``node_id`` enforces."""
    response: Any = await admin._send_request(_DescribeAcls(principal), node_id)
    if response.error_code != 0:
        raise BrokerError(
            f"listing the ACL entries of {principal}: {for_code(response.error_code).__name__}"
        )
    found: set[Grant] = set()
    for resource_type, name, pattern, acls in response.resources:
        for _, _, operation, permission in acls:
            if permission == _ALLOW:
                try:
                    found.add(
                        Grant(
                            ResourceType(resource_type),
                            name,
                            PatternType(pattern),
                            Operation(operation),
                        )
                    )
                except ValueError:
                    continue  # an entry of a kind vmreplica never grants
    return found


async def grant_site(
    admin_connection: KafkaConnection,
    user: str,
    password: str,
    grants: Sequence[Grant],
    *,
    mechanism: str = "SCRAM-SHA-512",
) -> None:
    """Create (or update) SCRAM user ``user`` and give it ``grants``; return once every broker
    enforces them and accepts the login.

    :raises BrokerError: the admin was refused, or the brokers did not catch up in time.
    """
    admin = AIOKafkaAdminClient(**admin_connection.options())
    try:
        await admin.start()
        await upsert_scram_user(admin, user, password, mechanism)
        await create_acls(admin, principal_of(user), grants)
        nodes = [broker.nodeId for broker in admin._client.cluster.brokers()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROPAGATION_SECONDS
        for node in nodes:
            while not set(grants) <= await acls_of(admin, principal_of(user), node):
                if loop.time() > deadline:
                    raise BrokerError(f"Kafka node {node} did not apply the ACLs of {user!r}")
                await asyncio.sleep(0.1)
    except KafkaError as error:
        raise BrokerError(f"granting Kafka user {user!r} access: {error}") from error
    finally:
        await admin.close()
    site = ClientSecurity(
        admin_connection.security.protocol,
        mechanism,  # type: ignore[arg-type]
        user,
        password,
        admin_connection.security.ca_file,
    )
    while True:
        try:
            await check_login(admin_connection.bootstrap_servers, site, f"{user}-check")
            return
        except ConfigurationError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
