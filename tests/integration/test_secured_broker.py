"""The secured broker (``broker up --secure``) refuses whoever it should, to any client.

The session's secured node serves the module. Site ``site-x`` of trust group ``tg-x`` and site
``site-y`` of ``tg-y`` each get their own principal; ``tg-y`` has a VM whose topics exist.
Then vmreplica's own clients (aiokafka) and an independent one (librdkafka, through
``confluent_kafka``) try without credentials, with a wrong password and as ``site-x``: the
broker refuses each, and the refusal is the one asserted (a failed login, a topic or a
transactional-id authorization failure) — with ``site-x``'s own group's resources working, so
the refusals come from the ACLs and not from a broken setting.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from tests.fixtures import SecuredKafka
from vmreplica.domain import names
from vmreplica.errors import AccessDenied, BrokerError, ConfigurationError
from vmreplica.journal import topics
from vmreplica.journal.credentials import ClientSecurity, check_login
from vmreplica.journal.kafka import (
    JournalPublisher,
    JournalReader,
    KafkaConnection,
    StatusPublisher,
    TopicAdmin,
)
from vmreplica.security.sites import SiteAccess

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Groups:
    """Two trust groups, a site of each, and a VM of ``tg-y`` whose topics exist."""

    x: SiteAccess
    y: SiteAccess
    vm: str

    def connection(self, security: ClientSecurity, bootstrap: str) -> KafkaConnection:
        return KafkaConnection(bootstrap, client_id="refused", security=security)


def _security(access: SiteAccess, password: str | None = None) -> ClientSecurity:
    return ClientSecurity(
        "SASL_SSL",
        "SCRAM-SHA-512",
        access.user,
        password if password is not None else access.password_file.read_text().strip(),
        access.ca_file,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secured")


@pytest.fixture
async def groups(secured_kafka: SecuredKafka, folder: Path) -> Groups:
    run = uuid.uuid4().hex[:6]
    x = await secured_kafka.add_site("site-x", f"tg-x{run}", folder)
    y = await secured_kafka.add_site("site-y", f"tg-y{run}", folder)
    vm = "vm1"
    connection = KafkaConnection(secured_kafka.bootstrap_servers, security=_security(y))
    async with TopicAdmin(connection) as admin:
        await admin.ensure_topic(topics.journal_spec(names.journal_topic(vm, y.trust_group), 1))
        await admin.ensure_topic(topics.status_spec(names.status_topic(vm, y.trust_group), 1))
    return Groups(x, y, vm)


async def test_a_site_works_in_its_own_trust_group(
    groups: Groups, secured_kafka: SecuredKafka
) -> None:
    """The control for every refusal below: site-y's principal publishes and reads its VM."""
    connection = groups.connection(_security(groups.y), secured_kafka.bootstrap_servers)
    topic = names.journal_topic(groups.vm, groups.y.trust_group)
    async with JournalPublisher(
        connection, names.transactional_id(groups.vm, groups.y.trust_group)
    ) as publisher:
        offsets = await publisher.publish(topic, b"k", [b"one", b"two"])
    async with JournalReader(connection, topic) as reader:
        got = [r.value for r in await reader.fetch(5.0)]
    assert got == [b"one", b"two"]
    assert offsets == [0, 1]


async def test_vmreplica_clients_without_credentials_or_with_a_wrong_password_are_refused(
    groups: Groups, secured_kafka: SecuredKafka
) -> None:
    bootstrap = secured_kafka.bootstrap_servers
    wrong = _security(groups.y, password="not-the-password")
    with pytest.raises(ConfigurationError, match=r"refused the login of user 'site-y") as caught:
        await check_login(bootstrap, wrong, "test")
    assert "not-the-password" not in str(caught.value)
    for security in (wrong, ClientSecurity("SSL", ca_file=secured_kafka.ca_file)):
        connection = groups.connection(security, bootstrap)
        publisher = JournalPublisher(
            KafkaConnection(bootstrap, security=security, extra={"request_timeout_ms": 5000}),
            names.transactional_id(groups.vm, groups.y.trust_group),
        )
        with pytest.raises(BrokerError, match="cannot reach Kafka"):
            await publisher.start()
        with pytest.raises(BrokerError):
            async with TopicAdmin(connection) as admin:
                await admin.topics()


async def test_vmreplica_clients_of_another_trust_group_are_refused(
    groups: Groups, secured_kafka: SecuredKafka
) -> None:
    """site-x logs in fine and may not touch tg-y's topics or transactional ids."""
    connection = groups.connection(_security(groups.x), secured_kafka.bootstrap_servers)
    await check_login(secured_kafka.bootstrap_servers, _security(groups.x), "test")
    topic = names.journal_topic(groups.vm, groups.y.trust_group)
    publisher = JournalPublisher(
        connection, names.transactional_id(groups.vm, groups.y.trust_group)
    )
    with pytest.raises(AccessDenied, match="to the transactional id"):
        await publisher.start()
    status = StatusPublisher(connection)
    await status.start()
    try:
        with pytest.raises(AccessDenied, match="to the topic"):
            await status.publish(names.status_topic(groups.vm, groups.y.trust_group), b"k", b"v")
    finally:
        await status.stop()
    with pytest.raises(AccessDenied, match="to the topic"):
        async with JournalReader(connection, topic) as reader:
            await reader.fetch(5.0)
    async with TopicAdmin(connection) as admin:
        with pytest.raises(AccessDenied, match="to the topic"):
            await admin.ensure_topic(
                topics.journal_spec(names.journal_topic("vm2", groups.y.trust_group), 1)
            )
        assert not [t for t in await admin.topics() if groups.y.trust_group in t]


def _librdkafka(bootstrap: str, ca_file: Path, **settings: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "ssl.ca.location": str(ca_file),
        "socket.timeout.ms": 5000,
        "message.timeout.ms": 10000,
        **settings,
    }


def _scram(access: SiteAccess, password: str | None = None) -> dict[str, Any]:
    return {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": access.user,
        "sasl.password": password or access.password_file.read_text().strip(),
    }


def _produce(config: dict[str, Any], topic: str) -> KafkaError | None:
    """Produce one record; the delivery error, or None when it was stored."""
    outcome: list[KafkaError | None] = []
    producer = Producer(config)
    producer.produce(topic, b"forged", partition=0, on_delivery=lambda e, _: outcome.append(e))
    producer.flush(30)
    assert outcome, "no delivery report within 30 s"
    return outcome[0]


def test_an_independent_client_is_refused_the_same_way(
    groups: Groups, secured_kafka: SecuredKafka
) -> None:
    bootstrap, ca = secured_kafka.bootstrap_servers, secured_kafka.ca_file
    topic = names.journal_topic(groups.vm, groups.y.trust_group)
    # Without credentials (TLS only) and with a wrong password: no metadata at all.
    for settings in (
        {"security.protocol": "SSL"},
        _scram(groups.y, password="not-the-password"),
    ):
        failed = _produce(_librdkafka(bootstrap, ca, **settings), topic)
        assert failed is not None
        assert failed.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._AUTHENTICATION)
    # As site-y (its own group): stored. As site-x: a topic authorization failure.
    assert _produce(_librdkafka(bootstrap, ca, **_scram(groups.y)), topic) is None
    refused = _produce(_librdkafka(bootstrap, ca, **_scram(groups.x)), topic)
    assert refused is not None
    assert refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # site-x cannot take over tg-y's transactional id (and so cannot fence its primary).
    transactional = Producer(
        _librdkafka(
            bootstrap,
            ca,
            **_scram(groups.x),
            **{"transactional.id": names.transactional_id(groups.vm, groups.y.trust_group)},
        )
    )
    with pytest.raises(KafkaException) as caught:
        transactional.init_transactions(30)
    assert caught.value.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    # Nor read tg-y's journal: its metadata is refused.
    consumer = Consumer(
        _librdkafka(
            bootstrap, ca, **_scram(groups.x), **{"group.id": f"vmreplica.{groups.x.trust_group}.c"}
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=15)
        error = metadata.topics[topic].error
        assert error is not None
        assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    finally:
        consumer.close()


def test_broker_cli_status_and_add_site(secured_kafka: SecuredKafka, tmp_path: Path) -> None:
    """`broker status --json` names the security settings; `broker add-site` prints a site's
    settings without its password, which sits in a file only its owner can read."""
    home = Path(secured_kafka.state.secure_folder or "").parent.parent
    env = {**os.environ, "VMREPLICA_HOME": str(home)}

    def vmreplica(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "vmreplica.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    status = json.loads(vmreplica("broker", "status", "--json"))
    assert status["security_protocol"] == "SASL_SSL"
    assert status["ca_file"] == str(secured_kafka.ca_file)
    assert Path(status["admin_properties"]).is_file()
    password_file = tmp_path / "site-q.password"
    out = vmreplica(
        "broker",
        "add-site",
        "site-q",
        "--trust-group",
        "tg-q",
        "--password-file",
        str(password_file),
    )
    password = password_file.read_text().strip()
    assert len(password) >= 24
    assert password not in out
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert 'sasl_username = "site-q"' in out
    assert f'sasl_password_file = "{password_file}"' in out
    # A second run for another group keeps the password.
    vmreplica(
        "broker",
        "add-site",
        "site-q",
        "--trust-group",
        "tg-r",
        "--password-file",
        str(password_file),
    )
    assert password_file.read_text().strip() == password
