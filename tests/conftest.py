"""Session-wide fixtures: one real Kafka broker per test session, and factories for topics.

The broker is ``$VMREPLICA_TEST_BOOTSTRAP`` when set (an existing cluster), otherwise the local
broker from ``deploy/``, started under a private ``VMREPLICA_HOME`` on its own port and stopped at
the end of the session.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import hypothesis  # noqa: F401 — see below
import pytest

from vmreplica.broker import LocalCluster
from vmreplica.kafka import KafkaConnection, TopicAdmin

# hypothesis is imported eagerly: its pytest plugin otherwise imports it at session end, where
# CPython 3.11 has been seen failing with "AST constructor recursion depth mismatch".
TEST_BROKER_PORT = int(os.environ.get("VMREPLICA_TEST_BROKER_PORT", "19592"))


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    existing = os.environ.get("VMREPLICA_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    # A fixed home per port: a broker left behind by a killed test run is found and replaced.
    home = Path(tempfile.gettempdir()) / f"vmreplica-test-kafka-{TEST_BROKER_PORT}"
    cluster = LocalCluster(home=home, base_port=TEST_BROKER_PORT)
    cluster.down()
    state = cluster.up(1)
    try:
        yield state.bootstrap_servers
    finally:
        cluster.down()


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
