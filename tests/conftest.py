"""Session-wide fixtures: one real Kafka broker per test session, and factories for topics.

The broker is ``$VMREPLICA_TEST_BOOTSTRAP`` when set (an existing cluster), otherwise the local
broker from ``deploy/``, started under a private ``VMREPLICA_HOME`` on its own port and stopped at
the end of the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# hypothesis is imported eagerly: its pytest plugin otherwise imports it at session end, where
# CPython 3.11 has been seen failing with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import pytest

from vmreplica.journal.kafka import KafkaConnection, TopicAdmin

if TYPE_CHECKING:
    from tests.fixtures import SecuredKafka

from tests.clusters import own_cluster, state_of

pytest_plugins = ["tests.fixtures"]


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    existing = os.environ.get("VMREPLICA_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    with own_cluster() as cluster:
        yield state_of(cluster).bootstrap_servers


@pytest.fixture(scope="session")
def secured_kafka() -> Iterator[SecuredKafka]:
    """A secured single node (``broker up --secure``), started when a test first asks for it
    and shared by the rest of the session: every test has its own trust group and users."""
    from tests.fixtures import SecuredKafka  # noqa: PLC0415 — a plugin, imported once registered

    with own_cluster(secure=True) as cluster:
        yield SecuredKafka(state_of(cluster))


@pytest.fixture(scope="session")
def kafka(bootstrap_servers: str) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers, client_id="vmreplica-tests")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names that never collide across tests sharing the session broker."""
    run = uuid.uuid4().hex[:8]
    return lambda stem: f"{stem}-{run}"


@pytest.fixture
async def topic_admin(kafka: KafkaConnection) -> AsyncIterator[TopicAdmin]:
    async with TopicAdmin(kafka) as admin:
        yield admin


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
