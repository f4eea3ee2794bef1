"""The local cluster's port choice and start-up error, without starting Kafka."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmreplica.devtools import ports
from vmreplica.devtools.cluster import _what_node_said
from vmreplica.devtools.ports import PORT_STRIDE_PER_NODE, free_base_port, port_free

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
