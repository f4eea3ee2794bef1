"""The local cluster's port choice, start-up error and sites, without starting Kafka."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from vmreplica.devtools import ports
from vmreplica.devtools.cluster import _properties, _racks, _what_node_said
from vmreplica.devtools.ports import PORT_STRIDE_PER_NODE, free_base_port, port_free
from vmreplica.errors import ConfigurationError

KAFKA_LOGS = Path(__file__).resolve().parents[1] / "data" / "kafka"
BIND_FAILURE_LOG = KAFKA_LOGS / "controller-bind-failure.server.log"
"""A real server.log of a node whose controller port was taken, trimmed."""


def test_free_base_port_stays_out_of_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_port_range", lambda: (20000, 60999))
    for _ in range(20):
        base = free_base_port(3)
        assert base >= 61000
        assert base + 3 * PORT_STRIDE_PER_NODE <= 65536


def test_a_port_held_without_listening_is_not_free() -> None:
    """The local end of an outgoing connection accepts nothing; a connect probe misses it."""
    base = free_base_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + 1))
        assert not port_free(base + 1)
        assert free_base_port(preferred=base) != base
    assert free_base_port(preferred=base) == base


def test_start_up_error_quotes_kafkas_errors_without_stack_frames(tmp_path: Path) -> None:
    (tmp_path / "server.log").write_text(BIND_FAILURE_LOG.read_text())
    (tmp_path / "stdout.log").write_text("")
    said = _what_node_said(tmp_path)
    assert said == (
        f"Kafka logged these errors (in {tmp_path / 'server.log'}):\n"
        "[2026-11-27 12:20:05,981] ERROR Unable to start acceptor for CONTROLLER "
        "(kafka.network.DataPlaneAcceptor)\n"
        "org.apache.kafka.common.KafkaException: Socket server failed to bind to "
        "127.0.0.1:24841: Address already in use.\n"
        "Caused by: java.net.BindException: Address already in use\n"
        "[2026-11-27 12:20:06,014] ERROR Encountered fatal fault: caught exception "
        "(org.apache.kafka.server.fault.ProcessTerminatingFaultHandler)\n"
        "java.lang.RuntimeException: Received a fatal error while waiting for all of the "
        "SocketServer Acceptors to be started"
    )


def test_start_up_error_falls_back_to_the_jvms_output(tmp_path: Path) -> None:
    (tmp_path / "server.log").write_text("")
    (tmp_path / "stdout.log").write_text("Error: Could not find or load main class kafka.Kafka\n")
    assert _what_node_said(tmp_path).endswith(
        "its output ends:\nError: Could not find or load main class kafka.Kafka"
    )


def test_a_stretched_cluster_puts_each_node_in_its_site(tmp_path: Path) -> None:
    racks = _racks(3, ["site-a", "site-b", "site-c"])
    assert racks == ("site-a", "site-b", "site-c")
    text = _properties(2, 3, 30000, tmp_path, None, rack=racks[1])
    assert "broker.rack=site-b\n" in text
    assert "min.insync.replicas=2\n" in text
    assert "broker.rack" not in _properties(1, 3, 30000, tmp_path, None)
    assert _racks(1, None) == (None,)


@pytest.mark.parametrize(
    ("brokers", "sites", "said"),
    [
        (1, ["site-a"], "each of the 3 nodes"),
        (3, ["site-a", "site-b"], "got 2 for 3 nodes"),
        (3, ["site-a", "site-a", "site-b"], "names a site twice"),
        (3, ["site-a", "../b", "site-c"], "is not allowed"),
    ],
)
def test_sites_of_a_stretched_cluster_are_refused_when_they_cannot_work(
    brokers: int, sites: list[str], said: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        _racks(brokers, sites)
